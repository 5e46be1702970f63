"""The evaluation driver: every task for every model, cached, resumable, one results.json.

Stage: eval. ``run_eval(cfg)`` (``tuna-ray eval --config ...``) evaluates ``cfg.model`` (or each
of ``cfg.models``) on ``cfg.tasks`` and writes::

    output_dir/results.json          {"model": {...}, "tasks": {NAME: {...}}}  (one model)
    output_dir/comparison.md         model x task table with confidence intervals (table.py)
    output_dir/<task>/result.json    one task's result, with its digest
    output_dir/<task>/judge|score/   the task's Ray Data stage (parts, manifest; stages.py)
    output_dir/generate/<digest>/    the model's answers, shared by tasks asking the same prompts

With ``models: [...]`` each model gets ``output_dir/<label>/`` as above, and the top-level
``results.json`` is ``{"models": {LABEL: <that model's results>}}``.

Caching, so a rerun pays nothing (digests.py): a task whose ``result.json`` (or
``cache_dir/<digest>.json``) holds the same task digest is not run again -- the digest covers
the model's weights, template and generation settings, the task, the items' content, the judge
and the bootstrap settings, not operational settings. Below that, each Ray Data stage has its
own digest: changing only the judge re-judges without regenerating, and a stage stopped
half-way resumes with the missing ids. Judge calls are also in the openai engine's response
cache when ``engine.cache_dir`` is set.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from tuna_ray import lease, storage, tracking
from tuna_ray.config import config_hash
from tuna_ray.data import parts
from tuna_ray.engines.factory import HFEngineSpec
from tuna_ray.eval.config import (
    EvalConfig,
    EvalModelConfig,
    PairwiseJudgeTask,
    RankingAgreementTask,
    RougeLTask,
    merged_sampling,
)
from tuna_ray.eval.digests import (
    engine_identity,
    finite_json,
    model_fingerprint,
    stage_digest,
    task_digest,
)
from tuna_ray.ranking.runner import run_stage

log = logging.getLogger(__name__)


@dataclass
class _Context:
    cfg: EvalConfig
    model: EvalModelConfig
    fingerprint: str
    output_dir: str
    endpoints: dict[str, str] | None

    @property
    def boot(self) -> dict:
        b = self.cfg.bootstrap
        return {"resamples": b.resamples, "seed": b.seed, "level": b.level}

    @property
    def scaling(self):
        if self.cfg.ray_address is None:
            return self.cfg.scaling
        return self.cfg.scaling.model_copy(update={"ray_address": self.cfg.ray_address})

    def task_dir(self, task) -> str:
        return storage.join(self.output_dir, task.name)

    def stage(self, spec, stage_cfg, rows: list[dict], source: str):
        """Run (or skip, or resume) one Ray Data stage; (records, failures, manifest)."""
        digest = stage_digest(stage_cfg, rows, self.fingerprint)
        manifest = parts.read_manifest(stage_cfg.output_dir)
        if manifest is None or manifest.get("config_hash") != digest:
            info = {"path": source, "read": len(rows), "used": len(rows), "skipped": {}}
            manifest = run_stage(
                spec, stage_cfg, rows, digest=digest, input_info=info, endpoints=self.endpoints
            )
        else:
            log.info("%s: finished with this digest, skipping", stage_cfg.output_dir)
        return _read_table(manifest["output"]), _read_failures(stage_cfg.output_dir), manifest

    def generate(self, rows: list[dict], overrides, prompt_format: str, source: str):
        """The model's answers ({id: text}) and what produced them (recorded in results).

        Answers live in ``<model output>/generate/<digest>/``: tasks asking the same questions
        with the same settings (one set, two judges) share one generation."""
        from tuna_ray.eval.stages import GENERATE, GenerateStageConfig

        engine = self.model.engine or HFEngineSpec(model=self.model.name_or_path)
        sampling = merged_sampling(self.model.generation, overrides)
        stage_cfg = GenerateStageConfig(
            output_dir="",
            engine=engine,
            scaling=self.scaling,
            sampling=sampling,
            template=self.model.template,
            system_prompt=self.model.system_prompt,
            prompt_format=prompt_format,
            max_failure_share=self.cfg.max_failure_share,
        )
        folder = storage.join(
            self.output_dir, "generate", stage_digest(stage_cfg, rows, self.fingerprint)
        )
        stage_cfg = stage_cfg.model_copy(update={"output_dir": folder})
        records, failures, manifest = self.stage(GENERATE, stage_cfg, rows, source)
        info = {
            "output_dir": folder,
            "engine": {"kind": engine.kind, **engine_identity(engine)},
            "sampling": sampling.model_dump(mode="json"),
            "template": self.model.template,
            "system_prompt": self.model.system_prompt,
            "prompt_format": prompt_format,
            "failed": len(failures),
            "usage": manifest.get("usage_this_run"),  # of the run that made the answers
        }
        return {r["id"]: r["answer"] for r in records}, info


def _read_table(uri: str) -> list[dict]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.read_table(f).to_pylist()


def _read_failures(output_dir: str) -> list[dict]:
    path = storage.join(output_dir, "failures.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line]


# ---------------------------------------------------------------- the three task kinds


def _pairwise(ctx: _Context, task: PairwiseJudgeTask, data) -> dict:
    from tuna_ray.eval.pairwise import DEFAULT_SAMPLING, score_pairwise
    from tuna_ray.eval.stages import JUDGE, JudgeStageConfig

    rows = [
        {"id": r["id"], "instruction": r["instruction"], "input": r["input"], "text": ""}
        for r in data.records
    ]
    answers, generation = ctx.generate(rows, task.generation, "template", data.source)
    judge_rows = [
        {
            "id": r["id"],
            "instruction": r["instruction"],
            "input": r["input"],
            "answer": answers[r["id"]],
            "reference": r["reference"],
        }
        for r in data.records
        if r["id"] in answers
    ]
    judge = task.judge
    sampling = merged_sampling(DEFAULT_SAMPLING[judge.template], judge.sampling)
    scaling = judge.scaling
    if ctx.cfg.ray_address is not None:
        scaling = scaling.model_copy(update={"ray_address": ctx.cfg.ray_address})
    stage_cfg = JudgeStageConfig(
        output_dir=storage.join(ctx.task_dir(task), "judge"),
        engine=judge.engine,
        scaling=scaling,
        template=judge.template,
        sampling=sampling,
        max_parse_retries=judge.max_parse_retries,
        max_failure_share=ctx.cfg.max_failure_share,
    )
    judged, failures, manifest = ctx.stage(JUDGE, stage_cfg, judge_rows, data.source)
    by_id = {r["id"]: r for r in judge_rows}
    items = [{**by_id[j["id"]], **j} for j in judged]
    result = score_pairwise(items, rule=judge.aggregate, **ctx.boot)
    result["data"] = {
        "source": data.source,
        "reference": data.reference_name,
        "questions": len(data.records),
    }
    result["failed"] = {"generation": len(data.records) - len(judge_rows), "judge": len(failures)}
    result["generation"] = generation
    result["judge"] = {
        "engine": engine_identity(judge.engine),
        "template": judge.template,
        "sampling": sampling.model_dump(mode="json"),
        "aggregate": judge.aggregate,
        "counts": {k: manifest["counts"].get(k) for k in JUDGE.count_fields},
        "usage": manifest.get("usage_this_run"),  # of the run that judged
    }
    return result


def _rouge_l(ctx: _Context, task: RougeLTask, instances) -> dict:
    from tuna_ray.eval.superni import score_super_ni

    rows = [
        {"id": i["id"], "instruction": i["prompt"], "input": "", "text": i["prompt"]}
        for i in instances
    ]
    answers, generation = ctx.generate(rows, task.generation, task.prompt_format, task.data.path)
    result = score_super_ni(instances, answers, **ctx.boot)
    result["data"] = {
        "path": task.data.path,
        "instances_per_task": task.data.instances_per_task,
    }
    result["generation"] = generation
    return result


def _agreement(ctx: _Context, task: RankingAgreementTask, loaded) -> dict:
    from tuna_ray.eval.agreement import score_ranking_agreement
    from tuna_ray.eval.stages import SCORE, ScoreStageConfig

    records, read = loaded
    engine = ctx.model.engine
    if not isinstance(engine, HFEngineSpec):  # the weights are scored in-process
        engine = HFEngineSpec(model=ctx.model.name_or_path)
    stage_cfg = ScoreStageConfig(
        output_dir=storage.join(ctx.task_dir(task), "score"),
        engine=engine,
        scaling=ctx.scaling,
        template=ctx.model.template,
        system_prompt=ctx.model.system_prompt,
        max_length=task.max_length,
        max_failure_share=ctx.cfg.max_failure_share,
    )
    rows = [
        {
            "id": r["id"],
            "instruction": r.get("instruction") or "",
            "input": r.get("input") or "",
            "prompt": r.get("prompt") or "",
            "responses": list(r["responses"]),
        }
        for r in records
    ]
    scored, failures, _ = ctx.stage(SCORE, stage_cfg, rows, task.data.path)
    by_id = {r["id"]: r["scores"] for r in scored}
    kept = [r for r in records if r["id"] in by_id]
    result = score_ranking_agreement(
        [by_id[r["id"]] for r in kept], [r["responses"] for r in kept], **ctx.boot
    )
    result["failed"] = len(failures)
    result["data"] = {"path": task.data.path, "read": read.num_read, "skipped": read.skipped}
    result["scorer"] = {
        "engine": {"kind": "hf", **engine_identity(engine)},
        "template": ctx.model.template,
        "max_length": task.max_length,
        "score": "mean token log-prob of the answer + EOS (tuna_ray.train.evaluate)",
    }
    return result


def _load(task):
    """(items, their content hash) of a task: loaded before the digest, so edited data re-runs."""
    from tuna_ray.eval import datasets

    if isinstance(task, PairwiseJudgeTask):
        data = datasets.load_pairwise_set(task.data)
        return data, config_hash({"items": data.records, "ref": data.reference_name})
    if isinstance(task, RougeLTask):
        instances = datasets.load_super_ni(task.data)
        return instances, config_hash({"items": instances})
    from tuna_ray.data.readers import read_ranked

    read = read_ranked(task.data.path, on_error=task.data.on_error, fmt=task.data.format)
    records = read.records[: task.data.limit]
    return (records, read), config_hash({"items": records})


_RUNNERS = {"pairwise_judge": _pairwise, "rouge_l": _rouge_l, "ranking_agreement": _agreement}


def _cached(ctx: _Context, task, digest: str) -> dict | None:
    places = [storage.join(ctx.task_dir(task), "result.json")]
    if ctx.cfg.cache_dir:
        places.append(storage.join(ctx.cfg.cache_dir, f"{digest}.json"))
    for path in places:
        if storage.exists(path):
            result = storage.read_json(path)
            if result.get("digest") == digest:
                return result
    return None


def _run_task(ctx: _Context, task) -> dict:
    loaded, items_hash = _load(task)
    digest = task_digest(ctx.model, ctx.fingerprint, task, items_hash, ctx.cfg.bootstrap)
    hit = _cached(ctx, task, digest)
    if hit is not None:
        log.info("%s / %s: cached (digest %s)", ctx.model.display_label, task.name, digest)
        storage.write_json(storage.join(ctx.task_dir(task), "result.json"), hit)
        return {**hit, "cached": True}
    log.info("%s / %s: running", ctx.model.display_label, task.name)
    started = time.time()
    result = _RUNNERS[task.kind](ctx, task, loaded)
    result = finite_json(
        {
            "kind": task.kind,
            **result,
            "ci_level": ctx.cfg.bootstrap.level,
            "digest": digest,
            "wall_time_s": round(time.time() - started, 1),
        }
    )
    storage.write_json(storage.join(ctx.task_dir(task), "result.json"), result)
    if ctx.cfg.cache_dir:
        storage.write_json(storage.join(ctx.cfg.cache_dir, f"{digest}.json"), result)
    return {**result, "cached": False}


# ---------------------------------------------------------------- public API


def evaluate_model(
    cfg: EvalConfig, model: EvalModelConfig, output_dir: str, endpoints=None
) -> dict:
    """One model on every task of ``cfg``; writes ``output_dir/results.json`` and returns it."""
    fingerprint = model_fingerprint(model)
    ctx = _Context(cfg, model, fingerprint, output_dir, endpoints)
    results = {
        "model": {
            "label": model.display_label,
            "name_or_path": model.name_or_path,
            "template": model.template,
            "fingerprint": fingerprint,
        },
        "tasks": {},
    }
    for task in cfg.tasks:
        results["tasks"][task.name] = _run_task(ctx, task)
        storage.write_json(storage.join(output_dir, "results.json"), results)  # progress
    return results


def run_eval(cfg: EvalConfig, endpoints: dict[str, str] | None = None) -> dict:
    """Evaluate ``cfg.model`` (or every model of ``cfg.models``); write results.json and
    comparison.md under ``cfg.output_dir`` (module docstring) and return the results.

    ``endpoints`` maps ``embedded:<name>`` engine URLs to running servers (``tuna-ray run``
    starts them; see ``embedded_servers``)."""
    from tuna_ray.eval.table import render_comparison

    started = time.time()
    storage.check_writable(cfg.output_dir)
    # One writer per output dir (tuna_ray.lease): a second eval into it stops at once.
    with lease.hold_lease(cfg.output_dir, what="eval"):
        if cfg.model is not None:
            results = evaluate_model(cfg, cfg.model, cfg.output_dir, endpoints)
            per_model = [results]
        else:
            per_model = [
                evaluate_model(cfg, m, storage.join(cfg.output_dir, m.display_label), endpoints)
                for m in cfg.model_list()
            ]
            results = {"models": {r["model"]["label"]: r for r in per_model}}
        results["wall_time_s"] = round(time.time() - started, 1)
        storage.write_json(storage.join(cfg.output_dir, "results.json"), results)
        storage.write_text(
            storage.join(cfg.output_dir, "comparison.md"), render_comparison(per_model)
        )
        tracking.write_eval(cfg.output_dir, per_model)
    return results


def embedded_servers(cfg: EvalConfig) -> set[str]:
    """Names of the ``embedded:<name>`` servers the config's engines point at."""
    engines = [m.engine for m in cfg.model_list()]
    engines += [t.judge.engine for t in cfg.tasks if isinstance(t, PairwiseJudgeTask)]
    urls = [getattr(e, "base_url", "") or "" for e in engines if e is not None]
    return {u.removeprefix("embedded:") for u in urls if u.startswith("embedded:")}

"""Ray Data shell of contextual ranking: candidates -> judge-ranked records.

    tuna-ray rank-contextual --config jobs/configs/<name>.yaml

``JudgeRanker`` actors send each record's candidates to an OpenAI-compatible judge (so the
stage inherits the engine's retries, QPS limit, cache and cost accounting), ``folds`` times in
different orders when asked, parse every reply (tuna_ray.ranking.contextual), ask again with a
new seed when a reply holds no valid ranking, and write ranked records. Driven by
``runner.run_stage``; every id ends ranked, excluded (fewer than 2 ranked answers) or failed
(API error, or no parsable reply after retries, with the raw replies kept).

UDF input columns: id, instruction, input, prompt, responses, generator, source, reference (the
dataset's own answer, ranked with the samples when ``include_original``).
UDF summary columns: id, status ("ok" | "failed" | "excluded"), reason, parse_failures,
reference_uncertain (the judge's own answer dropped: its end was not certain),
api_failures, judge_calls, fold_agreement (NaN when one fold) (+ usage).
"""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np

from tuna_ray.config import ContextualStageConfig
from tuna_ray.data.templates import render_prompt
from tuna_ray.engines.base import Prompt
from tuna_ray.ranking.contextual import (
    aggregate_folds,
    build_contextual_record,
    judge_order,
    judge_response_format,
    load_judge_template,
    map_to_original,
    pairwise_agreement,
    render_judge_messages,
)
from tuna_ray.ranking.judge_reply import parse_judge_reply
from tuna_ray.ranking.runner import (
    EngineUDF,
    StageSpec,
    ask_until_parsed,
    run_from_config,
    take_reply,
)


class JudgeRanker(EngineUDF):
    """Ray Data UDF: judge a batch of records (all folds, bounded re-asks), write one part."""

    config_model = ContextualStageConfig

    def __init__(self, config_json: str):
        super().__init__(config_json)
        load_judge_template(self.cfg.judge_template)  # an unknown name fails at start

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        cfg = self.cfg
        usage_before = self.engine.usage()
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["id"]))]
        # One judge job per (record, fold): the order shown and the replies so far.
        jobs = []
        for r, row in enumerate(rows):
            answers, _ = judge_candidates(row, self.cfg.include_original)
            prompt = (
                render_prompt(row["instruction"], row["input"] or "")
                if row["instruction"]
                else row["prompt"]
            )
            for fold in range(cfg.folds):
                order = judge_order(
                    len(answers),
                    shuffle=cfg.shuffle,
                    seed=cfg.shuffle_seed,
                    fold=fold,
                    key=row["id"],
                )
                messages = render_judge_messages(
                    prompt, [answers[i] for i in order], template=cfg.judge_template
                )
                jobs.append(
                    {
                        "row": r,
                        "fold": fold,
                        "order": order,
                        "messages": messages,
                        "raw": [],
                        "reply": None,
                        "error": None,
                    }
                )
        ask_until_parsed(jobs, "reply", cfg.max_parse_retries, self._ask)
        records, failures, summary = [], [], []
        for r, row in enumerate(rows):
            mine = [j for j in jobs if j["row"] == r]
            record, status, reason, agreement = self._record(row, mine)
            if record is not None:
                records.append(record)
            else:
                failures.append(
                    {
                        "id": row["id"],
                        "reason": reason,
                        "stage": "rank_contextual",
                        "judge_raw": [raw for j in mine for raw in j["raw"]],
                    }
                )
            summary.append(
                {
                    "id": row["id"],
                    "status": status,
                    "reason": reason or "",
                    "parse_failures": sum(len(j["raw"]) - (j["reply"] is not None) for j in mine),
                    "api_failures": sum(j["error"] is not None for j in mine),
                    "judge_calls": sum(len(j["raw"]) for j in mine),
                    # the judge's own answer was dropped: where it ends was not certain
                    "reference_uncertain": sum(
                        j["reply"] is not None and j["reply"].reference_status == "uncertain"
                        for j in mine
                    ),
                    "fold_agreement": math.nan if agreement is None else agreement,
                }
            )
        return self.finish(records, failures, summary, usage_before)

    def _ask(self, jobs: list[dict], attempt: int) -> None:
        """One judge call per open job (concurrently); a new seed per re-ask and fold."""
        params = self.cfg.judge_sampling
        seed = None if params.seed is None else params.seed + 1000 * attempt
        prompts = [
            Prompt(id=f"{j['row']}/{j['fold']}", messages=tuple(j["messages"])) for j in jobs
        ]
        # One call per (fold, number of answers shown): the seed follows the fold, and a JSON
        # judge's schema names the indices it may rank.
        groups: dict[tuple[int, int], list[int]] = {}
        for k, j in enumerate(jobs):
            groups.setdefault((j["fold"], len(j["order"])), []).append(k)
        grammar = getattr(self.cfg.engine, "kind", None) == "vllm"
        for (fold, shown), ks in groups.items():
            fold_params = params.model_copy(
                update={"n": 1, "seed": None if seed is None else seed + fold}
            )
            fmt = judge_response_format(self.cfg.judge_template, shown, grammar=grammar)
            replies = self.engine.complete_chat(
                [prompts[k] for k in ks], fold_params, response_format=fmt
            )
            for k, reply in zip(ks, replies):
                take_reply(
                    jobs[k],
                    reply,
                    "reply",
                    partial(parse_judge_reply, num_shown=shown, template=self.cfg.judge_template),
                )

    def _record(self, row, jobs):
        """(record, status, reason, fold agreement) for one instruction."""
        if any(j["error"] for j in jobs):
            return None, "failed", "api: " + next(j["error"] for j in jobs if j["error"]), None
        if any(j["reply"] is None for j in jobs):
            return (
                None,
                "failed",
                f"parse_failed: no valid ranking in {sum(len(j['raw']) for j in jobs)} replies",
                None,
            )
        answers, origins = judge_candidates(row, self.cfg.include_original)
        rankings = [
            _merge_duplicates(map_to_original(j["reply"].ranking, j["order"]), answers)
            for j in jobs
        ]
        n_items = len(answers) + 1
        best_first, points = aggregate_folds(rankings, n_items)
        reference = next(
            (j["reply"].reference_answer for j in jobs if j["reply"].reference_answer), None
        )
        record = build_contextual_record(
            {**row, "prompt": row["prompt"], "generator": row.get("generator")},
            answers,
            best_first,
            reference_answer=reference,
            include_judge_reference=self.cfg.include_judge_reference,
            judge_raw=[j["raw"][-1] for j in jobs],
            judge=self.engine.name,
            scores=points,
            origins=origins,
        )
        agreement = pairwise_agreement(rankings) if len(rankings) > 1 else None
        if record is None:
            return None, "excluded", "excluded: fewer than 2 ranked answers", agreement
        record["fold_rankings"] = json.dumps([[str(i) for i in r] for r in rankings])
        return record, "ok", None, agreement


def judge_candidates(row: dict, include_original: bool) -> tuple[list[str], list[str]]:
    """What the judge ranks: the student's samples, and the dataset's own answer when
    ``include_original`` (the reference code adds the original answers to both training
    sets), unless it repeats a sample. Returns (texts, origins).

    >>> judge_candidates({"responses": ["a", "b"], "reference": "c"}, True)
    (['a', 'b', 'c'], ['sample', 'sample', 'reference'])
    >>> judge_candidates({"responses": ["a", "b"], "reference": " b "}, True)[1]
    ['sample', 'sample']
    >>> judge_candidates({"responses": ["a", "b"], "reference": "c"}, False)[0]
    ['a', 'b']
    """
    answers = [str(a) for a in row["responses"]]
    origins = ["sample"] * len(answers)
    original = str(row.get("reference") or "").strip()
    if include_original and original and original not in {a.strip() for a in answers}:
        answers.append(str(row["reference"]))
        origins.append("reference")
    return answers, origins


def _merge_duplicates(ranking: list, answers: list[str]) -> list:
    """Identical answers are one item: each maps to the first index holding its text.

    Folds shown in different orders keep different copies of a duplicate; without this, Borda
    would split the text's points between its copies.
    """
    first: dict[str, int] = {}
    canonical = [first.setdefault(a.strip(), i) for i, a in enumerate(answers)]
    merged = [canonical[i] if isinstance(i, int) else i for i in ranking]
    return list(dict.fromkeys(merged))


CONTEXTUAL = StageSpec(
    name="rank_contextual",
    output="ranked",
    udf=JudgeRanker,
    count_fields=("parse_failures", "api_failures", "judge_calls", "reference_uncertain"),
    mean_fields=("fold_agreement",),
)


def run_contextual(cfg: ContextualStageConfig, endpoints: dict[str, str] | None = None) -> dict:
    """Run (or resume, or skip) contextual ranking; return its manifest."""
    from tuna_ray.data.readers import read_ranked

    columns = {
        "id": None,
        "instruction": "",
        "input": "",
        "prompt": "",
        "responses": None,
        "generator": "",
        "source": "",
        "reference": "",
    }
    return run_from_config(CONTEXTUAL, cfg, read_ranked, columns, endpoints=endpoints)

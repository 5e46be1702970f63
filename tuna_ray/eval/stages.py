"""Ray Data shell of evaluation: generate answers, judge pairs, score ranked answers.

Stage: eval. Three UDFs driven by ``tuna_ray.ranking.runner.run_stage`` (an actor pool, one
engine per actor, a Parquet part per batch, resume by id, a manifest), so an interrupted
evaluation resumes with only the missing ids and a finished one is skipped by its digest:

- ``AnswerGenerator`` (``GENERATE``): one answer per prompt from the evaluated model's engine
  (``hf`` actors on CPU/GPU, or an ``openai`` endpoint: a vLLM / Ray Serve server, an API).
  Input columns: id, instruction, input, text (a raw prompt, used when ``prompt_format`` is
  "raw"). Output records (``answers.parquet``): id, answer, num_tokens (-1 when the endpoint
  does not say), finish_reason, generator.
- ``PairwiseJudge`` (``JUDGE``): both orders of each (answer, reference) pair through an
  OpenAI-compatible judge (its retries, QPS limit, response cache and cost accounting), an
  unreadable reply asked again with a new seed (``max_parse_retries``). Input columns: id,
  instruction, input, answer, reference. Output records (``judgments.parquet``): id,
  model_first, reference_first (verdicts "first" | "second" | "tie" as shown), judge_raw (JSON
  list of every reply), judge. Summary counts: judge_calls, parse_failures, api_failures.
- ``AgreementScorer`` (``SCORE``): the length-normalised log-likelihood of every answer of a
  ranked record (tuna_ray.train.evaluate.score_candidates) in an ``hf`` engine's model. Input
  columns: id, instruction, input, prompt, responses. Output records (``scores.parquet``): id,
  scores.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Literal

import numpy as np
from pydantic import Field

from tuna_ray.config import StageScalingConfig, _Strict
from tuna_ray.engines.base import EngineError, Prompt, SamplingParams
from tuna_ray.engines.factory import EngineConfig, HFEngineSpec, JudgeEngineConfig
from tuna_ray.eval.pairwise import parse_verdict, render_pairwise
from tuna_ray.ranking.runner import (
    EngineUDF,
    StageSpec,
    ask_until_parsed,
    build_prompt,
    take_reply,
)

REASK_TEMPERATURE = 0.7  # a greedy judge repeats an unreadable reply: re-ask with some sampling


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    return [{k: batch[k][i] for k in batch} for i in range(len(batch["id"]))]


class _EvalStageConfig(_Strict):
    """What run_stage reads from every stage config (besides ``engine``)."""

    output_dir: str
    scaling: StageScalingConfig = StageScalingConfig()
    # More failed records than this share: the stage stops (results kept; a rerun retries).
    max_failure_share: float = Field(default=0.05, ge=0.0, le=1.0)


# ---------------------------------------------------------------- generation


class GenerateStageConfig(_EvalStageConfig):
    engine: EngineConfig
    sampling: SamplingParams
    template: Literal["alpaca", "chat"] = "alpaca"
    system_prompt: str | None = None
    prompt_format: Literal["template", "raw"] = "template"


class AnswerGenerator(EngineUDF):
    """Ray Data UDF: one answer per prompt, a part per batch."""

    config_model = GenerateStageConfig

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        cfg = self.cfg
        usage_before = self.engine.usage()  # for finish(); newer runners ignore it
        rows = _rows(batch)
        prompts = [self._prompt(r) for r in rows]
        params = cfg.sampling.model_copy(update={"n": 1})
        chat_api = getattr(getattr(self.engine, "config", None), "endpoint", None) == "chat"
        if chat_api:  # plain texts: evaluated endpoints need not return log-probs
            results = self.engine.complete_chat(prompts, params)
        else:
            results = self.engine.sample(prompts, params)
        generator = json.dumps(
            {"engine": self.engine.name, **params.model_dump(mode="json")}, sort_keys=True
        )
        records, failures, summary = [], [], []
        for row, result in zip(rows, results):
            if isinstance(result, EngineError):
                failures.append(
                    {"id": row["id"], "reason": result.reason, "stage": "eval_generate"}
                )
            else:
                sample = result[0]
                records.append(
                    {
                        "id": row["id"],
                        "answer": sample if chat_api else sample.text,
                        "num_tokens": -1 if chat_api else sample.num_tokens,
                        "finish_reason": None if chat_api else sample.finish_reason,
                        "generator": generator,
                    }
                )
            failed = isinstance(result, EngineError)
            summary.append(
                {
                    "id": row["id"],
                    "status": "failed" if failed else "ok",
                    "reason": result.reason if failed else "",
                }
            )
        return self.finish(records, failures, summary, usage_before)

    def _prompt(self, row: dict) -> Prompt:
        if self.cfg.prompt_format == "raw":
            text = str(row["text"])
            return Prompt(id=row["id"], text=text, messages=({"role": "user", "content": text},))
        record = {"id": row["id"], "instruction": row["instruction"], "input": row["input"]}
        return build_prompt(record, self.cfg.template, self.tokenizer, self.cfg.system_prompt)


GENERATE = StageSpec(name="eval_generate", output="answers", udf=AnswerGenerator)


# ---------------------------------------------------------------- pairwise judge


class JudgeStageConfig(_EvalStageConfig):
    engine: JudgeEngineConfig
    template: str
    sampling: SamplingParams
    max_parse_retries: int = 2


ORDERS = ("model_first", "reference_first")


class PairwiseJudge(EngineUDF):
    """Ray Data UDF: both orders of each pair, bounded re-asks, a part per batch."""

    config_model = JudgeStageConfig

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        cfg = self.cfg
        usage_before = self.engine.usage()  # for finish(); newer runners ignore it
        rows = _rows(batch)
        jobs = []  # one per (row, order)
        for r, row in enumerate(rows):
            answer, reference = str(row["answer"]), str(row["reference"])
            for order in ORDERS:
                first, second = (
                    (answer, reference) if order == "model_first" else (reference, answer)
                )
                messages = render_pairwise(
                    cfg.template, str(row["instruction"]), str(row["input"]), first, second
                )
                jobs.append(
                    {
                        "row": r,
                        "order": order,
                        "messages": messages,
                        "raw": [],
                        "verdict": None,
                        "error": None,
                    }
                )
        ask_until_parsed(jobs, "verdict", cfg.max_parse_retries, self._ask)
        records, failures, summary = [], [], []
        for r, row in enumerate(rows):
            mine = [j for j in jobs if j["row"] == r]
            raw = [text for j in mine for text in j["raw"]]
            reason = next((f"api: {j['error']}" for j in mine if j["error"]), None)
            if reason is None and any(j["verdict"] is None for j in mine):
                reason = f"parse_failed: no readable verdict in {len(raw)} replies"
            if reason is None:
                records.append(
                    {
                        "id": row["id"],
                        **{j["order"]: j["verdict"] for j in mine},
                        "judge_raw": json.dumps(raw),
                        "judge": self.engine.name,
                    }
                )
            else:
                failures.append(
                    {"id": row["id"], "reason": reason, "stage": "eval_judge", "judge_raw": raw}
                )
            summary.append(
                {
                    "id": row["id"],
                    "status": "failed" if reason else "ok",
                    "reason": reason or "",
                    "judge_calls": len(raw),
                    "parse_failures": sum(len(j["raw"]) - (j["verdict"] is not None) for j in mine),
                    "api_failures": sum(j["error"] is not None for j in mine),
                }
            )
        return self.finish(records, failures, summary, usage_before)

    def _ask(self, jobs: list[dict], attempt: int) -> None:
        params = self.cfg.sampling.model_copy(update={"n": 1})
        if attempt:
            params = params.model_copy(
                update={
                    "seed": None if params.seed is None else params.seed + attempt,
                    "temperature": max(params.temperature, REASK_TEMPERATURE),
                }
            )
        prompts = [
            Prompt(id=f"{j['row']}/{j['order']}", messages=tuple(j["messages"])) for j in jobs
        ]
        parse = partial(parse_verdict, self.cfg.template)
        for job, reply in zip(jobs, self.engine.complete_chat(prompts, params)):
            take_reply(job, reply, "verdict", parse)


JUDGE = StageSpec(
    name="eval_judge",
    output="judgments",
    udf=PairwiseJudge,
    count_fields=("judge_calls", "parse_failures", "api_failures"),
)


# ---------------------------------------------------------------- ranking agreement scores


class ScoreStageConfig(_EvalStageConfig):
    engine: HFEngineSpec
    template: Literal["alpaca", "chat"] = "alpaca"
    system_prompt: str | None = None
    max_length: int = 2048


class AgreementScorer(EngineUDF):
    """Ray Data UDF: score_candidates on a batch of ranked records, a part per batch."""

    config_model = ScoreStageConfig

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from tuna_ray.train.evaluate import score_candidates

        cfg = self.cfg
        usage_before = self.engine.usage()  # for finish(); newer runners ignore it
        rows = _rows(batch)
        records = [
            {
                "id": r["id"],
                "instruction": r["instruction"] or None,
                "input": r["input"] or "",
                "prompt": r["prompt"] or None,
                "responses": [str(x) for x in r["responses"]],
            }
            for r in rows
        ]
        scores = score_candidates(
            self.engine.model,
            self.engine.tokenizer,
            records,
            template=cfg.template,
            system_prompt=cfg.system_prompt,
            max_length=cfg.max_length,
            batch_size=cfg.engine.batch_size,
        )
        out, failures, summary = [], [], []
        for rec, s in zip(records, scores):
            # score_candidates drops an answer left with no tokens inside max_length; its
            # pairs cannot be scored, so the record is reported instead of misaligned.
            reason = None
            if len(s) != len(rec["responses"]):
                reason = f"{len(rec['responses']) - len(s)} answer(s) beyond max_length"
                failures.append({"id": rec["id"], "reason": reason, "stage": "eval_score"})
            else:
                out.append({"id": rec["id"], "scores": [float(x) for x in s]})
            summary.append(
                {"id": rec["id"], "status": "failed" if reason else "ok", "reason": reason or ""}
            )
        return self.finish(out, failures, summary, usage_before)


SCORE = StageSpec(name="eval_score", output="scores", udf=AgreementScorer)

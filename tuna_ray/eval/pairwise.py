"""Pairwise judging, pure core: judge prompts, verdict parsers, both orders, the win rate.

Stage: eval (no Ray here). Each question is judged twice, the model's answer shown first and
then second, so a judge that prefers a position cannot move the win rate:

    messages = render_pairwise(template, instruction, input, first, second)
    verdict = parse_verdict(template, reply)        # "first" | "second" | "tie"; ValueError
    outcome = model_outcome(verdict, model_first)   # 1 win, 0.5 tie, 0 loss (for the model)
    score = combine_orders(o_model_first, o_reference_first, rule)
    score_pairwise(items, rule=...)                 # win rate, CI, lengths, LC win rate

Templates (files under tuna_ray/assets/eval, licences there):

- ``fastchat_pair_v2``: FastChat's MT-bench/Vicuna pairwise prompt ``pair-v2`` (system + user
  message; the question, answers A and B; verdict ``[[A]]``, ``[[B]]`` or ``[[C]]`` = tie).
  FastChat takes ``[[A]]`` whenever it appears; we take the *last* verdict token (the prompt asks
  for the verdict at the end, and explanations may quote the format). No token: unreadable.
  Defaults as FastChat: temperature 0, max 2048 tokens.
- ``alpaca_eval_gpt4``: AlpacaEval's GPT-4 annotator (its ChatML file split into system + user
  messages; outputs as ``model_1`` / ``model_2``). The reply is a Python list of
  ``{'model': ..., 'rank': ...}``; like AlpacaEval's ``ranking_parser`` the verdict is
  ``model_1``'s rank (1: first wins, 2: second wins); we also require a list of such dicts and
  reject ``model_2`` holding the same rank. No ties. Defaults as AlpacaEval: temperature 0,
  max 100 tokens.
- ``tuna_contextual``: Tuna's own contextual-ranking judge prompt (METHOD.md; the paper's text)
  with two responses: the judge writes its own answer as Response 2 and ranks; the verdict is
  which of Response 0 / 1 ranks higher, a tie when it keeps only one of them (duplicates).
  Temperature 0, max 2048 tokens.

How both orders combine (``rule``): ``consistent`` (FastChat, MT-bench): a win or a loss must
hold in both orders, anything else is a tie (0.5); ``mean``: the average of the two outcomes
(so win + tie = 0.75). Both cancel a pure position bias: a judge that always picks the first
answer scores every question 0.5.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from tuna_ray.engines.base import SamplingParams
from tuna_ray.eval.stats import bootstrap_ci, length_controlled_ci, length_controlled_win_rate

Verdict = Literal["first", "second", "tie"]
Rule = Literal["consistent", "mean"]
VERDICTS = ("first", "second", "tie")

DEFAULT_SAMPLING = {
    "fastchat_pair_v2": SamplingParams(n=1, temperature=0.0, max_tokens=2048, seed=0),
    "alpaca_eval_gpt4": SamplingParams(n=1, temperature=0.0, max_tokens=100, seed=0),
    "tuna_contextual": SamplingParams(n=1, temperature=0.0, max_tokens=2048, seed=0),
}


def _asset(*parts: str) -> str:
    return (
        resources.files("tuna_ray").joinpath("assets", "eval", *parts).read_text(encoding="utf-8")
    )


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace ``{key}`` for the given keys in one pass (an answer that itself contains
    ``{answer_b}`` is not filled in again; other braces stay as written)."""
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template)


def question_text(instruction: str, input: str = "") -> str:
    """What the judge is shown as the question: the instruction, plus its input if any."""
    return f"{instruction}\n\n{input}" if (input or "").strip() else instruction


# ---------------------------------------------------------------- fastchat_pair_v2


@cache
def _fastchat_prompt() -> dict:
    for line in _asset("vicuna_qa", "judge_prompts.jsonl").splitlines():
        prompt = json.loads(line)
        if prompt["name"] == "pair-v2":
            return prompt
    raise RuntimeError("pair-v2 is missing from assets/eval/vicuna_qa/judge_prompts.jsonl")


def _fastchat_messages(instruction: str, input: str, first: str, second: str) -> list[dict]:
    prompt = _fastchat_prompt()
    user = _fill(
        prompt["prompt_template"],
        {"question": question_text(instruction, input), "answer_a": first, "answer_b": second},
    )
    return [
        {"role": "system", "content": prompt["system_prompt"]},
        {"role": "user", "content": user},
    ]


_FASTCHAT_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_fastchat(reply: str) -> Verdict:
    """The last ``[[A]]`` / ``[[B]]`` / ``[[C]]`` of the reply.

    >>> parse_fastchat("A is clearer. Final verdict: [[A]]")
    'first'
    >>> parse_fastchat("Format: [[A]], [[B]] or [[C]]. My verdict: [[C]]")
    'tie'
    """
    found = _FASTCHAT_VERDICT.findall(reply)
    if not found:
        raise ValueError("no [[A]], [[B]] or [[C]] verdict in the judge's reply")
    return {"A": "first", "B": "second", "C": "tie"}[found[-1]]


# ---------------------------------------------------------------- alpaca_eval_gpt4


def chatml_messages(text: str) -> list[dict]:
    """``<|im_start|>role\\ncontent<|im_end|>`` blocks as chat messages (contents stripped), as
    AlpacaEval turns its prompt files into messages."""
    messages = []
    for block in text.split("<|im_start|>")[1:]:
        role, _, rest = block.partition("\n")
        messages.append({"role": role.strip(), "content": rest.split("<|im_end|>")[0].strip()})
    if not messages:
        raise ValueError("no <|im_start|> blocks in the prompt")
    return messages


def _alpaca_eval_messages(instruction: str, input: str, first: str, second: str) -> list[dict]:
    text = _asset("alpaca_eval", "evaluator_prompts", "alpaca_eval_gpt4", "alpaca_eval.txt")
    values = {
        "instruction": question_text(instruction, input),
        "output_1": first,
        "output_2": second,
    }
    return [{**m, "content": _fill(m["content"], values)} for m in chatml_messages(text)]


def _python_list(reply: str):
    for candidate in (reply.strip(), reply[reply.find("[") : reply.rfind("]") + 1]):
        try:
            return ast.literal_eval(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    raise ValueError("the judge's reply holds no Python list")


def parse_alpaca_eval(reply: str) -> Verdict:
    """``model_1``'s rank in AlpacaEval's ranking format.

    >>> parse_alpaca_eval("[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]")
    'second'
    """
    ranking = _python_list(reply)
    if not isinstance(ranking, list) or not all(isinstance(r, dict) for r in ranking):
        raise ValueError("the judge's ranking is not a list of {'model', 'rank'} dicts")
    ranks = {r.get("model"): r.get("rank") for r in ranking}
    rank = ranks.get("model_1")
    if rank not in (1, 2) or isinstance(rank, bool):
        raise ValueError(f"model_1 has rank {rank!r}, expected 1 or 2")
    if ranks.get("model_2") == rank:
        raise ValueError("model_1 and model_2 have the same rank")
    return "first" if rank == 1 else "second"


# ---------------------------------------------------------------- tuna_contextual


def _tuna_messages(instruction: str, input: str, first: str, second: str) -> list[dict]:
    from tuna_ray.data.templates import render_prompt
    from tuna_ray.ranking.contextual import render_judge_messages

    return render_judge_messages(render_prompt(instruction, input or ""), [first, second])


def parse_tuna_contextual(reply: str) -> Verdict:
    """Which of Response 0 / 1 the judge ranks higher (a tie when one or both are left out)."""
    from tuna_ray.ranking.judge_reply import parse_judge_reply

    ranking = parse_judge_reply(reply, 2).ranking
    if 0 in ranking and 1 in ranking:
        return "first" if ranking.index(0) < ranking.index(1) else "second"
    return "tie"


# ---------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class PairwiseTemplate:
    name: str
    render: Callable[[str, str, str, str], list[dict]]  # (instruction, input, first, second)
    parse: Callable[[str], Verdict]  # ValueError when unreadable
    default_sampling: SamplingParams


TEMPLATES = {
    "fastchat_pair_v2": PairwiseTemplate(
        "fastchat_pair_v2", _fastchat_messages, parse_fastchat, DEFAULT_SAMPLING["fastchat_pair_v2"]
    ),
    "alpaca_eval_gpt4": PairwiseTemplate(
        "alpaca_eval_gpt4",
        _alpaca_eval_messages,
        parse_alpaca_eval,
        DEFAULT_SAMPLING["alpaca_eval_gpt4"],
    ),
    "tuna_contextual": PairwiseTemplate(
        "tuna_contextual",
        _tuna_messages,
        parse_tuna_contextual,
        DEFAULT_SAMPLING["tuna_contextual"],
    ),
}


def get_template(name: str) -> PairwiseTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown pairwise judge template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def render_pairwise(
    template: str, instruction: str, input: str, first: str, second: str
) -> list[dict]:
    """Chat messages asking the judge to compare ``first`` (shown as A / model_1 / Response 0)
    with ``second``."""
    return get_template(template).render(instruction, input or "", first, second)


def parse_verdict(template: str, reply: str) -> Verdict:
    return get_template(template).parse(reply)


# ---------------------------------------------------------------- outcomes and the win rate


def model_outcome(verdict: Verdict, model_first: bool) -> float:
    """1 if the model's answer won, 0.5 for a tie, 0 if the reference won.

    >>> model_outcome("first", True), model_outcome("first", False), model_outcome("tie", True)
    (1.0, 0.0, 0.5)
    """
    if verdict == "tie":
        return 0.5
    if verdict not in ("first", "second"):
        raise ValueError(f"unknown verdict {verdict!r}")
    return 1.0 if (verdict == "first") == model_first else 0.0


def combine_orders(model_first: float, reference_first: float, rule: Rule) -> float:
    """One question's score from its two orders' outcomes (see the module docstring).

    >>> combine_orders(1.0, 1.0, "consistent"), combine_orders(1.0, 0.5, "consistent")
    (1.0, 0.5)
    >>> combine_orders(1.0, 0.5, "mean"), combine_orders(1.0, 0.0, "mean")
    (0.75, 0.5)
    """
    if rule == "mean":
        return (model_first + reference_first) / 2
    if rule == "consistent":
        return model_first if model_first == reference_first else 0.5
    raise ValueError(f"unknown rule {rule!r}; expected 'consistent' or 'mean'")


def score_pairwise(
    items: Sequence[dict],
    *,
    rule: Rule = "consistent",
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """The win rate of the model over judged questions.

    ``items``: one dict per question with ``model_first`` and ``reference_first`` (the verdicts
    of the two orders), ``answer`` and ``reference`` (texts; lengths in characters).

    Returns ``win_rate`` = 100 x mean question score (ties count half) with its bootstrap
    ``ci``; ``wins`` / ``ties`` / ``losses`` (score above / at / below 0.5); ``inconsistent``
    (share of questions whose two orders disagree); ``first_position_rate`` (share of decisive
    verdicts that picked the answer shown first: 0.5 for a judge without position bias);
    ``avg_length`` and ``reference_avg_length`` (characters); ``lc_win_rate`` with ``lc_ci``
    (stats.length_controlled_win_rate).
    """
    if not items:
        nan = math.nan
        return {"metric": "win_rate", "value": nan, "win_rate": nan, "ci": [nan, nan], "n": 0}
    o_mf = [model_outcome(i["model_first"], True) for i in items]
    o_rf = [model_outcome(i["reference_first"], False) for i in items]
    scores = [combine_orders(a, b, rule) for a, b in zip(o_mf, o_rf)]
    verdicts = [i[k] for i in items for k in ("model_first", "reference_first")]
    decisive = [v for v in verdicts if v != "tie"]
    m_len = [len(i["answer"]) for i in items]
    r_len = [len(i["reference"]) for i in items]
    boot = {"resamples": resamples, "seed": seed, "level": level}
    win_rate = 100.0 * sum(scores) / len(scores)
    lo, hi = bootstrap_ci(scores, **boot)
    lc_lo, lc_hi = length_controlled_ci(scores, m_len, r_len, **boot)
    return {
        "metric": "win_rate",
        "value": win_rate,
        "win_rate": win_rate,
        "ci": [100.0 * lo, 100.0 * hi],
        "n": len(items),
        "wins": sum(s > 0.5 for s in scores),
        "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores),
        "rule": rule,
        "inconsistent": sum(a != b for a, b in zip(o_mf, o_rf)) / len(items),
        "first_position_rate": (
            sum(v == "first" for v in decisive) / len(decisive) if decisive else math.nan
        ),
        "avg_length": sum(m_len) / len(m_len),
        "reference_avg_length": sum(r_len) / len(r_len),
        "lc_win_rate": length_controlled_win_rate(scores, m_len, r_len),
        "lc_ci": [lc_lo, lc_hi],
    }

"""Contextual ranking, pure core: a judge LLM sees all N answers at once and ranks them.

Stage: ranking (no Ray here). METHOD.md, "Contextual ranking details": the judge is shown the
Alpaca prompt and the student's answers as ``###Response 0..N-1``, writes its own answer
``###Response N`` and ranks up to N+1 entries, dropping duplicates (so N varies per record).

Flow for one record; fold f of k shows the same answers in another order:

    order = judge_order(N, shuffle=..., seed=..., fold=f, key=record_id)   # shown -> original
    messages = render_judge_messages(prompt, [answers[i] for i in order])
    reply = parse_judge_reply(raw, N)  # judge_reply.py; ValueError: ask again (bounded)
    ranking = map_to_original(reply.ranking, order)  # N (the judge's own) -> REFERENCE
    best_first, points = aggregate_folds([ranking_fold_0, ...], N + 1)  # Borda when k > 1
    build_contextual_record(record, answers, best_first, ...)  # None: < 2 survive, excluded
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import string
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import combinations, permutations

_I = re.IGNORECASE
REFERENCE = "reference"  # the judge's own answer ("###Response N") after map_to_original
JUDGE_TEMPLATES = ("paper_v1", "json_v1")


# ---------------------------------------------------------------- templates and messages


@dataclass(frozen=True)
class JudgeTemplate:
    name: str
    system: str
    user: string.Template  # $prompt $responses $shown_list $reference_index $all_list ...
    response_format: dict | None  # OpenAI ``response_format``; set for the JSON variants


def _read(name: str) -> str | None:
    path = resources.files("tuna_ray.ranking").joinpath("judge_templates", name)
    # files end with one newline; the messages don't
    return path.read_text(encoding="utf-8").removesuffix("\n") if path.is_file() else None


@cache
def load_judge_template(name: str) -> JudgeTemplate:
    """Versioned files ``judge_templates/<name>.txt``, ``.system.txt``, ``.schema.json`` (JSON)."""
    if name not in JUDGE_TEMPLATES:
        raise ValueError(f"unknown judge template {name!r}; known: {', '.join(JUDGE_TEMPLATES)}")
    schema = _read(f"{name}.schema.json")
    fmt = {"type": "json_schema", "json_schema": json.loads(schema)} if schema else None
    user = string.Template(_read(f"{name}.txt"))
    return JudgeTemplate(name, _read(f"{name}.system.txt"), user, fmt)


MAX_ENUMERATED_ORDERS = 5040  # 7!: up to 6 shown answers + the judge's own


def judge_response_format(template: str, num_shown: int, *, grammar: bool = False) -> dict | None:
    """The template's ``response_format`` for ``num_shown`` answers (None: a text template).

    The ranking (and each score's "response") may only name 0..num_shown, the last being the
    judge's own answer. ``grammar``: the engine decodes under the schema (vLLM's structured
    outputs), so the schema can do what a strict API's cannot: with up to 7 entries the ranking
    must be one of their orderings -- a grammar has no "each item once" rule, and a repeated
    index would be a parse failure -- else 2 to num_shown + 1 valid indices, and the judge's
    own answer is at most 4000 characters and there is at most one score per entry, so a small
    model cannot fill ``max_tokens`` with either.
    """
    fmt = load_judge_template(template).response_format
    if fmt is None:
        return None
    fmt = json.loads(json.dumps(fmt))  # a copy to specialise
    props = fmt["json_schema"]["schema"]["properties"]
    entries = list(range(num_shown + 1))
    index = {"type": "integer", "enum": entries}
    props["scores"]["items"]["properties"]["response"] = index
    props["ranking"] = {"type": "array", "items": index}
    if grammar:
        props["reference_answer"]["maxLength"] = 4000
        # one score per entry at most: a small model may otherwise repeat entries to max_tokens
        props["scores"]["maxItems"] = len(entries)
        if math.factorial(len(entries)) <= MAX_ENUMERATED_ORDERS:
            props["ranking"] = {"enum": [list(p) for p in permutations(entries)]}
        else:
            props["ranking"].update(minItems=2, maxItems=len(entries))
    return fmt


_LETTERS = "ijklmnopqrstuvwxyzabcdefgh"  # the paper's placeholders start at i


def _rank_examples(num_entries: int) -> tuple[str, str]:
    """The paper's "'rank: [i, j ,k, l, m]'" and its shorter forms, for ``num_entries`` entries."""
    if num_entries > len(_LETTERS):
        raise ValueError(f"at most {len(_LETTERS) - 1} responses can be shown to the judge")
    letters = list(_LETTERS[:num_entries])
    full = ", ".join(letters).replace(", k", " ,k", 1)  # the reference's odd "[i, j ,k, l, m]"
    shorter = [f"'rank: [{', '.join(letters[:n])}]'" for n in range(num_entries - 1, 1, -1)]
    listed = ", ".join(shorter[:-1]) + " " + shorter[-1] if len(shorter) > 1 else "".join(shorter)
    tail = "'rank: [i]'" if not listed else f"{listed} or even 'rank: [i]'"
    return f"rank: [{full}]", tail


def render_judge_messages(
    prompt: str, responses: list[str], *, template: str = "paper_v1"
) -> list[dict]:
    """System + user messages asking the judge to rank ``responses`` (in the order shown).

    ``prompt`` is the full Alpaca-formatted prompt. With 4 responses and ``paper_v1`` the user
    message is the reference code's text verbatim; other N generalise its numbers.
    """
    if not responses:
        raise ValueError("the judge needs at least one response")
    tpl = load_judge_template(template)
    n = len(responses)
    rank_full, rank_shorter = _rank_examples(n + 1)
    user = tpl.user.substitute(
        prompt=prompt,
        responses="\n\n".join(f"###Response {k}:\n{r}" for k, r in enumerate(responses)),
        shown_list="/".join(str(k) for k in range(n)),
        reference_index=n,
        all_list="/".join(str(k) for k in range(n + 1)),
        rank_full=rank_full,
        rank_shorter=rank_shorter,
    )
    return [{"role": "system", "content": tpl.system}, {"role": "user", "content": user}]


def judge_order(num: int, *, shuffle: bool, seed: int, fold: int = 0, key: str = "") -> list[int]:
    """``order[shown_position] = original_index`` for one judge call.

    Without ``shuffle``: fold f shows the answers rotated by f (fold 0 = original order), so
    k-fold judging still varies positions. With ``shuffle``: a permutation drawn from
    sha256(seed, fold, key), deterministic per (seed, fold, record id), different across ids.
    """
    if not shuffle:
        return [(i + fold) % num for i in range(num)] if num else []
    digest = hashlib.sha256(f"{seed}\x00{fold}\x00{key}".encode()).digest()
    order = list(range(num))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def map_to_original(shown_ranking: Sequence[int], order: Sequence[int]) -> list[int | str]:
    """Shown indices -> original indices; the judge's own index ``len(order)`` -> REFERENCE."""
    out: list[int | str] = []
    for shown in shown_ranking:
        if shown == len(order):
            out.append(REFERENCE)
        elif 0 <= shown < len(order):
            out.append(order[shown])
        else:
            raise ValueError(f"shown index {shown} outside 0..{len(order)}")
    return out


# ---------------------------------------------------------------- folds and the ranked record


def _index(item: Hashable, num_items: int) -> int:
    return num_items - 1 if item == REFERENCE else int(item)


def borda_points(rankings: Sequence[Sequence[Hashable]], num_items: int) -> dict[Hashable, int]:
    """Borda points: position p (0 = best) earns ``num_items - p``; an item absent from a fold
    (dropped there as a duplicate) earns 0 in it. Items never ranked are left out."""
    points: dict[Hashable, int] = {}
    for ranking in rankings:
        for p, item in enumerate(ranking):
            points[item] = points.get(item, 0) + num_items - p
    return points


def borda(rankings: Sequence[Sequence[Hashable]], num_items: int) -> list:
    """Aggregate fold rankings best-first by Borda points (``borda_points``).

    Ties: the better best single position across folds wins, then the lower index (REFERENCE
    counts as index ``num_items - 1``, the judge's own number).
    """
    points = borda_points(rankings, num_items)
    best = {i: min(r.index(i) for r in rankings if i in r) for i in points}
    return sorted(points, key=lambda i: (-points[i], best[i], _index(i, num_items)))


def aggregate_folds(
    rankings: Sequence[Sequence[Hashable]], num_items: int
) -> tuple[list, list[int] | None]:
    """(best-first items, their Borda points); one fold passes through with points None."""
    if len(rankings) == 1:
        return list(rankings[0]), None
    points, order = borda_points(rankings, num_items), borda(rankings, num_items)
    return order, [points[i] for i in order]


def pairwise_agreement(rankings: Sequence[Sequence[Hashable]]) -> float | None:
    """Share of (fold pair, item pair) comparisons ordered alike, over items both folds rank;
    1.0 = folds agree, 0.0 = reversed; None when nothing is comparable (fewer than 2 folds)."""
    same = total = 0
    for a, b in combinations(rankings, 2):
        pos_b = {x: p for p, x in enumerate(b)}
        common = [x for x in a if x in pos_b]  # in a's order
        for x, y in combinations(common, 2):
            total += 1
            same += pos_b[x] < pos_b[y]
    return same / total if total else None


def build_contextual_record(
    record: dict,
    candidates: list[str],
    ranking_original: Sequence[int | str],
    *,
    reference_answer: str | None,
    include_judge_reference: bool,
    judge_raw: list[str],
    judge: str,
    scores: Sequence[float] | None = None,
    origins: Sequence[str] | None = None,
) -> dict | None:
    """The ranked record (DESIGN.md schema) from the judge's ranking in original indices.

    Candidates the judge left out (duplicates) are dropped; REFERENCE becomes the judge's own
    answer when ``include_judge_reference`` (and it was extracted), else it is skipped; a text
    equal (after stripping) to a better-ranked one is dropped. ``scores`` (Borda points,
    aligned with ``ranking_original``) are kept for the survivors; ``origins`` names where each
    candidate came from ("sample" when not given). Returns None when fewer
    than 2 answers survive: the caller counts and excludes the record.
    """
    kept: list[tuple[str, str, float | None]] = []
    seen: set[str] = set()
    for pos, item in enumerate(ranking_original):
        if item == REFERENCE:
            if not include_judge_reference or not (reference_answer or "").strip():
                continue
            text, origin = reference_answer, "judge_reference"
        elif isinstance(item, int) and 0 <= item < len(candidates):
            text, origin = candidates[item], origins[item] if origins else "sample"
        else:
            raise ValueError(f"record {record.get('id')}: ranked item {item!r} is no candidate")
        if text.strip() in seen:
            continue
        seen.add(text.strip())
        kept.append((text, origin, None if scores is None else scores[pos]))
    if len(kept) < 2:
        return None
    return {
        "id": record["id"],
        "instruction": record.get("instruction"),
        "input": record.get("input") or "",
        "prompt": record.get("prompt"),
        "responses": [t for t, _, _ in kept],
        "scores": None if scores is None else [s for _, _, s in kept],
        "origins": [o for _, o, _ in kept],
        "ranking": "contextual",
        "judge_raw": json.dumps(judge_raw),
        "generator": record.get("generator"),
        "judge": judge,
        "source": record.get("source"),
    }

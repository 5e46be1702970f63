"""Contextual ranking, pure core: a judge LLM sees all N answers at once and ranks them.

Stage: ranking (no Ray here). METHOD.md, "Contextual ranking details": the judge is shown the
Alpaca prompt and the student's answers as ``###Response 0..N-1``, writes its own answer
``###Response N`` and ranks up to N+1 entries, dropping duplicates (so N varies per record).

Flow for one record; fold f of k shows the same answers in another order:

    order = judge_order(N, shuffle=..., seed=..., fold=f, key=record_id)   # shown -> original
    messages = render_judge_messages(prompt, [answers[i] for i in order])
    reply = parse_judge_reply(raw, N)  # ValueError: retry (bounded), then record the failure
    ranking = map_to_original(reply.ranking, order)  # N (the judge's own) -> REFERENCE
    best_first, points = aggregate_folds([ranking_fold_0, ...], N + 1)  # Borda when k > 1
    build_contextual_record(record, answers, best_first, ...)  # None: < 2 survive, excluded
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import combinations

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


# ---------------------------------------------------------------- parsing the judge's reply

_KEYWORD = re.compile(r"(?<![a-z])rank(?:ing|ings)?(?![a-z])['\"]?", _I)
_LABEL_WORDS = "of|the|responses?|from|best|to|worst|order|final|overall|in|decreasing|descending"
_AFTER = re.compile(  # "Ranking of the responses (best first):" - a few known words, no others
    rf"(?:[ \t]+(?:{_LABEL_WORDS})(?![a-z]))*[ \t]*(?:\([^()\n]{{0,40}}\))?"
    r"[ \t]*(?P<sep>[:=]|is\b:?)?[ \t]*(?P<nl>\n\s*)?['\"]?",
    _I,
)
_ITEM = re.compile(r"""['"]?(?:response[ \t]*#?[ \t]*)?(\d+)['"]?""", _I)
_SPLIT_WS = re.compile(r"(?<![a-z#\s])\s+", _I)  # whitespace after a number or a quote
_LINE_ITEM = re.compile(
    r"[ \t]*(?:(?P<pos>\d+)[.):][ \t]+|[-+•][ \t]+)?"
    r"(?:response[ \t]*#?[ \t]*(?P<a>\d+)|(?P<b>\d+))"
    r"(?:[ \t]+[-–—][ \t].*|[ \t]*[:(].*)?[ \t]*\.?[ \t]*",
    _I,
)
_LOOKS_LIKE_ITEM = re.compile(r"[ \t]*(?:\d+[.):]|[-+•][ \t]|response[ \t]*#?[ \t]*\d)", _I)
_CHAIN_LABEL = re.compile(r"[^\n:>\[\]]{0,40}:[ \t]*")


def _items(body: str) -> list[int] | None:
    """``body`` as a list of response numbers separated by one kind of separator, else None."""
    body = body.strip()
    has_gt, has_comma = ">" in body, "," in body or ";" in body
    if has_gt and has_comma:
        return None
    if has_gt:
        parts = body.split(">")
    elif has_comma:
        parts = re.split(r"[,;]", body)
    else:
        parts = _SPLIT_WS.split(body)
    matches = [_ITEM.fullmatch(p.strip()) for p in parts]
    return [int(m.group(1)) for m in matches] if all(matches) else None


def _numbered_lines(rest: str) -> list[int] | None:
    """A list spread over lines ("1. Response 2", "- 0", ...), ending at a blank line."""
    out, positions = [], []
    for line in rest.split("\n"):
        if not line.strip():
            break
        m = _LINE_ITEM.fullmatch(line)
        if m is None:
            if _LOOKS_LIKE_ITEM.match(line):
                return None  # an item we cannot read: the list is not what it seems
            break
        out.append(int(m.group("a") or m.group("b")))
        positions.append(m.group("pos"))
    if any(positions) and [int(p or 0) for p in positions] != list(range(1, len(out) + 1)):
        return None
    return out if len(out) >= 2 else None


def _after_keyword(text: str) -> list[int] | None:
    """The ranking written right after a "rank"/"ranking" keyword, or None."""
    if re.match(r"[ \t]*1[ \t]*[:.)]", text):  # "Rank 1: Response 2\nRank 2: Response 0"
        return _numbered_lines(re.sub(r"(?im)^[ \t]*rank[ \t]*", "", text.lstrip(" \t")))
    m = _AFTER.match(text)
    rest = text[m.end() :]
    if rest.startswith("["):
        end = rest.find("]")
        body = rest[1:end] if end > 0 else ""
        return _items(body) if body.strip() and "[" not in body and len(body) < 500 else None
    if m.group("nl") is None:  # same line: "Ranking: 2 > 0 > 1", "rank: Response 3, Response 1"
        items = _items(rest.split("\n", 1)[0].rstrip(" \t.")) if m.group("sep") else None
        return items if items and len(items) >= 2 else None
    first = _items(rest.split("\n", 1)[0].rstrip(" \t."))
    return first if first and len(first) >= 2 else _numbered_lines(rest)


def _validated(items: list[int], num_candidates: int, source: str) -> list[int]:
    bad = [i for i in items if not 0 <= i < num_candidates]
    if bad:
        raise ValueError(f"{source}: index {bad[0]} outside 0..{num_candidates - 1}: {items}")
    if len(set(items)) != len(items):
        raise ValueError(f"{source}: repeated index in {items}")
    return items


def _normalise(text: str) -> str:
    return text.replace("*", "").replace("`", "").replace("__", "")


def parse_ranking(text: str, num_candidates: int) -> list[int]:
    """The judge's ranking, best-first, as shown indices in ``0..num_candidates-1``.

    The last "rank:"/"ranking" statement that reads as a list wins (a bracketed list, possibly
    over several lines; a one-line "a, b" / "a > b" list of numbers or "Response k" names; a
    numbered or bulleted list on the following lines); failing that, the last line that is a
    ">" chain. A bracketed list may hold a single entry; unbracketed forms need two (a lone
    "rank 1" is prose). Raises ValueError when nothing reads as a ranking or when the chosen
    one has an index out of range or repeated (never an earlier one in its place).
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    text = _normalise(text)
    found = [r for m in _KEYWORD.finditer(text) if (r := _after_keyword(text[m.end() :]))]
    if found:
        return _validated(found[-1], num_candidates, "rank statement")
    chains = []
    for line in text.split("\n"):
        line = line.strip().rstrip(".")
        label = _CHAIN_LABEL.match(line)
        body = line[label.end() :] if label else line
        items = _items(body) if ">" in body else None
        if items and len(items) >= 2:
            chains.append(items)
    if chains:
        return _validated(chains[-1], num_candidates, "'>' chain")
    raise ValueError("no ranking found in the judge's reply")


_PAREN = r"(?:\([^()\n]{0,40}\)[ \t]*)?"  # "Response 4 (reference):"
_BLOCK_END = re.compile(
    r"[ \t]*(?:#|(?:first|second|third|fourth|fifth|last|finally|step[ \t]*\d)\b[ \t]*[,:.]"
    r"|response[ \t]*\d|rank|(?:ratings?|scores?)[ \t]*:|-{3,}[ \t]*$|_{3,}[ \t]*$"
    r"|.*\bduplicate)",  # the judge's next step (the paper's step 3 is about duplicates)
    _I,
)


def extract_reference_answer(text: str, index: int) -> str | None:
    """The text of the judge's own ``###Response <index>`` block, or None when absent/empty.

    The header is a ``###Response k`` heading (text may follow on the same line) or a line of
    its own ("Response k:", emphasis allowed); a plain "Response k: 14" is a rating, not a
    header. Best effort: the block ends at the first line that looks like the judge's next step
    (a heading, a line starting "Response k", "rank", "Scores:", a rule, "Fourth," ..., or a
    mention of duplicates).
    """
    text = text.replace("*", "")
    header = re.compile(
        rf"^[ \t]*(?:#+[ \t]*response[ \t]*{index}\b[ \t]*{_PAREN}:?[ \t]*(?P<same>[^\n]*)"
        rf"|response[ \t]*{index}\b[ \t]*{_PAREN}:?[ \t]*$)",
        _I | re.MULTILINE,
    )
    for m in header.finditer(text):
        lines = [m.group("same") or ""]
        for line in text[m.end() :].split("\n")[1:]:
            if _BLOCK_END.match(line):
                break
            lines.append(line)
        answer = "\n".join(lines).strip()
        if answer:
            return answer
    return None


def _json_object(text: str) -> dict:
    """The reply as a JSON object: whole, or the span from its first "{" to its last "}"."""
    for candidate in (text, text[text.find("{") : text.rfind("}") + 1]):
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise ValueError("the judge's reply holds no JSON object")


def parse_json_ranking(text: str, num_candidates: int) -> list[int]:
    """The ``ranking`` field of a ``json_v1`` reply, validated like ``parse_ranking``."""
    ranking = _json_object(text).get("ranking")
    if not isinstance(ranking, list) or not ranking:
        raise ValueError("JSON reply has no non-empty 'ranking' list")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking):
        raise ValueError(f"JSON 'ranking' holds non-integers: {ranking}")
    return _validated(ranking, num_candidates, "JSON ranking")


@dataclass(frozen=True)
class JudgeReply:
    ranking: list[int]  # shown indices, best-first; len(shown) is the judge's own answer
    reference_answer: str | None


def parse_judge_reply(text: str, num_shown: int, *, template: str = "paper_v1") -> JudgeReply:
    """Ranking (over ``num_shown`` answers + the judge's own) and the judge's own answer."""
    if load_judge_template(template).response_format is not None:
        ranking = parse_json_ranking(text, num_shown + 1)
        ref = _json_object(text).get("reference_answer")
        return JudgeReply(ranking, ref.strip() or None if isinstance(ref, str) else None)
    return JudgeReply(parse_ranking(text, num_shown + 1), extract_reference_answer(text, num_shown))


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
) -> dict | None:
    """The ranked record (DESIGN.md schema) from the judge's ranking in original indices.

    Candidates the judge left out (duplicates) are dropped; REFERENCE becomes the judge's own
    answer when ``include_judge_reference`` (and it was extracted), else it is skipped; a text
    equal (after stripping) to a better-ranked one is dropped. ``scores`` (Borda points,
    aligned with ``ranking_original``) are kept for the survivors. Returns None when fewer
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
            text, origin = candidates[item], "sample"
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

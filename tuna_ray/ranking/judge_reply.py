"""Parsing a judge's reply: its ranking, the duplicates it named, and its own answer.

Stage: ranking (pure, no Ray), used by the contextual ranking stage (contextual_stage.py). The
rules are strict on purpose: a reply yields a ranking only when it can be read without doubt
(anything else is a ``ValueError`` that the stage answers by asking again), and the judge's own
answer is returned whole or not at all (``find_reference_answer``), never cut short.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tuna_ray.ranking.contextual import load_judge_template

_I = re.IGNORECASE

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


_RESPONSE_LIST = (  # "Response 1", "Responses 1 and 3", "Response 0, Response 2 and 3"
    r"responses?[ \t]*#?[ \t]*\d+(?:[ \t]*(?:,[ \t]*(?:and|&)?|and|&)[ \t]*"
    r"(?:responses?[ \t]*#?[ \t]*)?\d+(?!\d))*"
)
_ADVERB = r"(?:(?:all|both|an?|exact|exactly|essentially|basically|virtually)[ \t]+)*"
_CLAUSE_END = (  # "...of Response 1 and Response 2 is the best" names 1, not 2
    r"(?=[ \t]*(?:$|[.,;:!?()\[\]\n–—-]|(?:and|so|but|which|while|because|since|hence|thus)\b))"
)
_DUPLICATES_NAMED = re.compile(  # only affirmative statements: "are not duplicates" never matches
    rf"(?:(?P<a>{_RESPONSE_LIST})[ \t]+(?:are|were)[ \t]+{_ADVERB}"
    r"(?:duplicates?|duplicated|identical|the[ \t]+same)\b"
    rf"(?:[ \t]+(?:of|to|as)[ \t]+(?P<b>{_RESPONSE_LIST}))?"
    rf"|(?P<c>responses?[ \t]*#?[ \t]*\d+)[ \t]+(?:is|was)[ \t]+{_ADVERB}"
    rf"(?:duplicate|copy|identical|the[ \t]+same)[ \t]+(?:of|to|as)[ \t]+(?P<d>{_RESPONSE_LIST})"
    rf"|(?P<e>responses?[ \t]*#?[ \t]*\d+)[ \t]+duplicates[ \t]+(?P<f>{_RESPONSE_LIST})"
    rf"|duplicat\w*(?:[ \t]+responses?)?[ \t]*(?::|are|were)[ \t]*(?P<g>{_RESPONSE_LIST})"
    rf"){_CLAUSE_END}",
    _I,
)
_NEGATED = re.compile(r"\b(?:no|not|any|without|none)[ \t]*\Z", _I)


def _duplicate_groups(text: str) -> list[set[int]]:
    """Groups of responses the reply names as duplicates of each other (normalised text)."""
    groups = []
    for m in _DUPLICATES_NAMED.finditer(text):
        line_start = text.rfind("\n", 0, m.start()) + 1  # a negation on this line only
        if _NEGATED.search(text[max(line_start, m.start() - 12) : m.start()]):
            continue  # "There are no duplicates: Response 1 and 2 differ"
        names = " ".join(g for g in m.groups() if g)
        groups.append({int(n) for n in re.findall(r"\d+", names)})
    return groups


def _justified(ranking: list[int], num_candidates: int, groups: list[set[int]]) -> bool:
    """At least 2 entries, and each candidate left out is named a duplicate of a kept one."""
    kept = set(ranking)
    return len(ranking) >= 2 and all(
        any(m in g and g & kept for g in groups) for m in range(num_candidates) if m not in kept
    )


def _final_ranking(
    statements: list[list[int]], num_candidates: int, text: str, source: str
) -> list[int]:
    """The rule of ``parse_ranking`` over its statements, in reply order."""
    final = _validated(statements[-1], num_candidates, source)
    groups = _duplicate_groups(text)
    if _justified(final, num_candidates, groups):
        return final
    for p in range(len(statements) - 2, -1, -1):  # the last justified one, then only recaps
        s = statements[p]
        valid = len(set(s)) == len(s) and all(0 <= i < num_candidates for i in s)
        if not (valid and _justified(s, num_candidates, groups)):
            continue
        if all(len(r) < len(s) and s[: len(r)] == r for r in statements[p + 1 :]):
            return s  # "rank: [4, 2, 0, 1, 3] ... in short, 4 > 2": a top-k recap
        break
    missing = sorted(set(range(num_candidates)) - set(final))
    if len(final) < 2:
        raise ValueError(f"{source}: {final} ranks fewer than 2 responses")
    raise ValueError(
        f"{source}: {final} leaves out {missing}, which the reply does not name as duplicates "
        "of a ranked response, and it is no recap of a full ranking"
    )


def parse_ranking(text: str, num_candidates: int) -> list[int]:
    """The judge's ranking, best-first, as shown indices in ``0..num_candidates-1``.

    Statements: every "rank:"/"ranking" statement that reads as a list (a bracketed list,
    possibly over several lines; a one-line "a, b" / "a > b" list of numbers or "Response k"
    names; a numbered or bulleted list on the following lines); failing any, every line that is
    a ">" chain. A bracketed list may hold a single entry; unbracketed forms need two (a lone
    "rank 1" is prose).

    Which one: the last statement, validated (an index out of range or repeated raises; never
    an earlier one in its place), if it is *justified*: at least 2 entries, and every candidate
    it leaves out is named in the reply as a duplicate of a candidate it keeps ("Response 0 and
    Response 3 are duplicates", "Response 3 is a duplicate of Response 1", "Duplicates:
    Response 1 and 3"; negated statements do not count). Otherwise, if it is a top-k recap
    ("... in short, 4 > 2") of the last justified earlier statement -- it and every statement
    after that one are strict prefixes of it -- that earlier statement. Anything else raises
    ValueError: a ranking that silently leaves out candidates, fewer than 2 entries, a recap
    that disagrees. The stage re-asks on ValueError.
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    text = _normalise(text)
    found = [r for m in _KEYWORD.finditer(text) if (r := _after_keyword(text[m.end() :]))]
    if found:
        return _final_ranking(found, num_candidates, text, "rank statement")
    chains = []
    for line in text.split("\n"):
        line = line.strip().rstrip(".")
        label = _CHAIN_LABEL.match(line)
        body = line[label.end() :] if label else line
        items = _items(body) if ">" in body else None
        if items and len(items) >= 2:
            chains.append(items)
    if chains:
        return _final_ranking(chains, num_candidates, text, "'>' chain")
    raise ValueError("no ranking found in the judge's reply")


# The judge's own answer. Its block ends where the reply's structure says (the next response
# header, the ratings block, the rank statement), never at words an answer may hold.
_PAREN = r"(?:\([^()\n]{0,40}\)[ \t]*)?"  # "Response 4 (reference):"
_HEADER = re.compile(  # "###Response 4: text", "Second, ### Response 4", "Response 4 (ref):"
    r"[ \t]*(?:(?:second|step[ \t]*2)[ \t]*[,.:)-][ \t]*)?(?P<hashes>#+)?[ \t]*"
    rf"response[ \t]*(?P<k>\d+)(?!\d)[ \t]*{_PAREN}:?[ \t]*(?P<same>.*)",
    _I,
)
_SCORE = re.compile(r"\[?[ \t]*\d+(?:\.\d+)?[ \t]*(?:\.?[ \t]*$|[\]/+=(]|points?\b|out of\b)", _I)
_RATING = re.compile(  # "Response 0: 12", "- Response 1: [5+4+5=14]", "Response 2 (dup) = 9/15"
    r"[ \t]*(?:[-+•>]|\d+[.)])?[ \t]*#*[ \t]*response[ \t]*#?[ \t]*\d+(?!\d)[ \t]*"
    rf"{_PAREN}[:=–—-][ \t]*\[?[ \t]*\d",
    _I,
)
_RANK_LEAD = re.compile(  # what may stand before the keyword of a rank statement line
    r"[^\w\n]*(?:(?:last(?:ly)?|finally|fifth|step[ \t]*\d+|the|my|final|overall|so|thus"
    r"|in[ \t]+(?:summary|short|conclusion))\b[^\w\n]*)*",
    _I,
)
_CANDIDATE = re.compile(r"\bresponses?[ \t]*#?[ \t]*(\d+)(?!\d)", _I)
_DUP_WORD = re.compile(r"duplicat|identical|distinct|unique", _I)
_GROUP_WORD = re.compile(r"\bresponses\b", _I)
_LABEL = re.compile(  # a bare label of a judge step: "### Ratings", "Fourth, scores.", "Dups: none"
    r"\W*(?:(?:step[ \t]*\d+|first|second|third|fourth|fifth|last|lastly|finally|next)\b"
    r"[ \t]*[,:.)-]?[ \t]*)?(?:the[ \t]+)?(?:final[ \t]+|overall[ \t]+)?"
    r"(?:duplicat\w*(?:[ \t]+(?:responses?|check))?|ratings?|scores?|scoring|rank|ranking)"
    r"[ \t]*(?:[:.][ \t]*(?:none\.?)?)?[ \t]*",
    _I,
)
_STEP = re.compile(r"\W*(?:third|fourth|fifth|last|lastly|finally|next|now|step[ \t]*\d+)\b", _I)
_JUDGE_WORD = re.compile(r"duplicat|identical|distinct|unique|scor|rating|rank|compar|respons", _I)
_RULE = re.compile(r"[ \t]*([-*_=])(?:[ \t]*\1){2,}[ \t]*")


def _header(line: str) -> tuple[int, str] | None:
    """(k, text after the header) when ``line`` (normalised) heads a ``Response k`` block."""
    m = _HEADER.fullmatch(line)
    if m is None:
        return None
    same = m.group("same").strip()
    if m.group("hashes") is None and same:
        return None  # "Response 4: 14", "Response 4 is the best": not a header
    if same and _SCORE.match(same):
        return None  # "###Response 4: 15" is a rating
    return int(m.group("k")), same


def _ends_block(norm: list[str], j: int) -> bool:
    """Line j starts the reply's next section: a response header, a rating, a rank statement."""
    line = norm[j]
    if _header(line) or _RATING.match(line):
        return True
    lead = _RANK_LEAD.match(line).end()
    key = _KEYWORD.match(line, lead)
    return key is not None and _after_keyword("\n".join([line[key.end() :], *norm[j + 1 :]]))


def _judge_line(line: str, index: int) -> bool:
    """A line only the judge writes: it names a candidate by number, says which responses are
    duplicates/distinct, or is a bare step label ("Scores:")."""
    return (
        any(int(k) <= index for k in _CANDIDATE.findall(line))
        or bool(_DUP_WORD.search(line) and _GROUP_WORD.search(line))
        or bool(re.search(r"\bno[ \t]+duplicat", line, _I))
        or bool(_LABEL.fullmatch(line))
    )


def find_reference_answer(text: str, index: int) -> tuple[str | None, str]:
    """(answer, status) for the judge's own ``###Response <index>``; status says why None.

    status "found"; "absent": no header, or nothing before the next section; "uncertain": the
    block's end cannot be told from the reply's structure, so the answer is dropped rather
    than cut short or padded with the judge's notes.

    Header: the first ``###Response k`` heading (text may follow on the same line; "Second,"
    may precede it) or a line of its own ("Response k:", "Response k (reference):", emphasis
    allowed). "Response k: 14" and "###Response k: 15" are ratings, not headers; a header of
    another response before it makes the reply's layout unknown ("uncertain").

    End: the next line that starts a section of the reply: any response header, a rating line
    "Response k: <number>", or a rank statement ("rank: [...]", "Last, the ranking is ...").
    None follows -> "uncertain" (the reply may be cut off). Then the judge's notes between the
    answer and that section are dropped from the end: blank lines, rules, the line that
    introduces the section (ending in ":" or a heading), and lines only the judge writes
    (naming a candidate by number, "Response 1 and Response 3 are duplicates", "There are no
    duplicates", "All responses are distinct", a bare label "Fourth, scores."). "uncertain" when
    such a judge line is still left inside the answer (the notes do not simply follow it) or
    the answer's last line reads like the judge's next step ("Third, ... duplicate ...").
    Words inside the answer ("First,", "Step 1:", "## Ingredients", "rank", "Response")
    never end it. The answer is returned as written (emphasis kept).
    """
    lines = text.split("\n")
    norm = [_normalise(line) for line in lines]
    headers = [(j, h) for j, line in enumerate(norm) if (h := _header(line))]
    start = next((p for p, (_, (k, _s)) in enumerate(headers) if k == index), None)
    if start is None:
        return None, "absent"
    if any(k != index for _, (k, _s) in headers[:start]):
        return None, "uncertain"
    first, (_, same) = headers[start]
    end = next((j for j in range(first + 1, len(lines)) if _ends_block(norm, j)), None)
    if end is None:
        return None, "uncertain"
    if not (_header(norm[end]) or _RATING.match(norm[end])) and any(
        _header(n) or _RATING.match(n) for n in norm[end + 1 :]
    ):
        return None, "uncertain"  # a rank statement before the ratings may be the answer's own
    if same:  # the answer's first line as written, emphasis kept
        head = re.match(
            rf".*?response[*_ \t]*{index}(?!\d)[ \t]*{_PAREN}[*_ \t]*:?(?:[ \t]*[*_]{{2}}(?!\S))?",
            lines[first],
            _I,
        )
        same = (lines[first][head.end() :] if head else same).strip()
    block = [(same, _normalise(same))] + list(zip(lines[first + 1 : end], norm[first + 1 : end]))
    k = len(block)
    while k and not block[k - 1][1].strip():
        k -= 1
    intro = block[k - 1][1] if k else ""
    if intro.rstrip().endswith(":") or intro.lstrip().startswith("#"):
        if not (_STEP.match(intro) or _JUDGE_WORD.search(intro) or _LABEL.fullmatch(intro)):
            return None, "uncertain"  # "Here it is:" or the answer's own "Ingredients:"?
        k -= 1  # "Fourth, the scores:", "### Ratings", "Step 4:": introduces the section
    while k and (
        not block[k - 1][1].strip() or _RULE.fullmatch(block[k - 1][0])
        or _judge_line(block[k - 1][1], index)
    ):  # fmt: skip
        k -= 1
    kept = block[:k]
    if not "\n".join(orig for orig, _ in kept).strip():
        return None, "absent"
    if any(_judge_line(n, index) for _, n in kept):
        return None, "uncertain"
    last = kept[-1][1]
    if (_STEP.match(last) and _JUDGE_WORD.search(last)) or _DUP_WORD.search(last):
        return None, "uncertain"
    return "\n".join(orig for orig, _ in kept).strip(), "found"


def extract_reference_answer(text: str, index: int) -> str | None:
    """The whole text of the judge's own ``###Response <index>`` block, or None when absent or
    its end is uncertain (never a prefix); see ``find_reference_answer``."""
    return find_reference_answer(text, index)[0]


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
    """The ``ranking`` field of a ``json_v1`` reply, validated like ``parse_ranking``.

    At least 2 entries. It may leave candidates out: json_v1 asks the judge to keep one of each
    group of duplicates, and the reply holds no statement naming them (nor can the parser
    compare texts), so a shorter list is taken as given. There is one ranking field, so no
    recap can stand in for it.
    """
    ranking = _json_object(text).get("ranking")
    if not isinstance(ranking, list) or not ranking:
        raise ValueError("JSON reply has no non-empty 'ranking' list")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking):
        raise ValueError(f"JSON 'ranking' holds non-integers: {ranking}")
    if len(ranking) < 2:
        raise ValueError(f"JSON ranking: {ranking} ranks fewer than 2 responses")
    return _validated(ranking, num_candidates, "JSON ranking")


@dataclass(frozen=True)
class JudgeReply:
    ranking: list[int]  # shown indices, best-first; len(shown) is the judge's own answer
    reference_answer: str | None
    reference_status: str  # "found" | "absent" | "uncertain" (see find_reference_answer)


def parse_judge_reply(text: str, num_shown: int, *, template: str = "paper_v1") -> JudgeReply:
    """Ranking (over ``num_shown`` answers + the judge's own) and the judge's own answer."""
    if load_judge_template(template).response_format is not None:
        ranking = parse_json_ranking(text, num_shown + 1)
        ref = _json_object(text).get("reference_answer")
        ref = ref.strip() or None if isinstance(ref, str) else None
        return JudgeReply(ranking, ref, "found" if ref else "absent")
    ranking = parse_ranking(text, num_shown + 1)
    return JudgeReply(ranking, *find_reference_answer(text, num_shown))

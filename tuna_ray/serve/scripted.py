"""Scripted answers for ``tuna-ray serve --mode fixed|judge``: an OpenAI server without a model.

Stage: serve. Pure functions (no network, no model) that the server wraps in async endpoints,
for benchmarks of the HTTP client and for tests of the ranking stages.

Text is cut into pieces by ``split_tokens`` (a word or punctuation mark with its leading
whitespace; the pieces join back to the text). A piece's log-prob depends only on the piece
and the one before it (``token_logprob``, in [-3.02, -0.02]), so answers are deterministic, an
answer scored with ``echo`` gets the log-probs it was sampled with, and identical texts score
identically. ``top_logprobs`` are the k most likely of the sampled piece (probability p) and
made-up alternatives (probabilities (1 - p) / 2**j), sorted, so they form a distribution.

``fixed``: every request gets ``n`` canned answers, derived from a hash of the request (prompt
or messages, ``seed``, choice index), cut at ``max_tokens`` (then ``finish_reason: length``).

``judge``: the contextual-ranking judge of METHOD.md, scripted. The last user message must be
a judge prompt: ``<PROMPT>`` then blocks ``\\n\\n###Response k:\\n<Rk>`` for k = 0..N-1, then
``\\n\\n\\n`` and the instructions (any wording: the last triple newline ends the blocks). The
judge writes its own reference answer, ``"Reference answer for: "`` + the first 40 characters
of the instruction (whitespace collapsed), as Response N, and ranks all N + 1 by ``rule``:

- ``length``: longer text (in characters) is better; ``reverse_length``: shorter is better;
  ``index``: lower index is better (so the reference, index N, comes last). Ties go to the
  lower index. The reference is ranked like any other response, by its own text.
- identical texts are duplicates: only the lowest index of each group enters the ranking; its
  twins get the same score. Scores are ``max(0, 15 - place)`` (the best scores 15).

Paper format (``ranking_reply(..., as_json=False)``)::

    The instruction is open-ended.          (close-ended when the prompt has "### Input:")

    ###Response 4:
    Reference answer for: Give three tips for staying healthy.

    Response 0: 13
    ...
    Response 4: 15

    rank: [4, 1, 0, 2]

JSON format (the request has ``response_format: {"type": "json_schema", ...}``; the shape of
``tuna_ray/ranking/judge_templates/json_v1.schema.json``, whose schema is not checked), one
object; ``scores`` has the kept responses only, by number::

    {"instruction_type": "open-ended", "reference_answer": "Reference answer for: ...",
     "scores": [{"response": 0, "score": 13}, ..., {"response": 4, "score": 15}],
     "ranking": [4, 1, 0, 2]}
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from tuna_ray.engines.hf import Generation
from tuna_ray.serve import openai_format as fmt

ScriptedMode = Literal["fixed", "judge"]
JudgeRule = Literal["length", "reverse_length", "index"]
JUDGE_RULES = ("length", "reverse_length", "index")
REFERENCE_PREFIX = "Reference answer for: "
MAX_SCORE = 15

_PIECE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")
_HEADER = re.compile(r"\n\n###Response (\d+):\n")
_INSTRUCTION = re.compile(r"### Instruction:\n(.*?)\n\n### (?:Input|Response):", re.DOTALL)
_WORDS = (
    "the",
    "answer",
    "is",
    "clear",
    "and",
    "simple",
    "because",
    "each",
    "step",
    "follows",
    "from",
    "a",
    "previous",
    "one",
    "so",
    "we",
    "can",
    "explain",
    "it",
    "briefly",
    "with",
    "an",
    "example",
    "then",
    "add",
    "details",
    "about",
    "why",
    "this",
    "works",
    "in",
    "practice",
    "for",
    "most",
    "readers",
    "who",
    "want",
    "short",
    "useful",
    "summary",
    "of",
    "main",
    "idea",
)


class ScriptedRequestError(ValueError):
    """A request the scripted backend cannot answer (HTTP 400); says what it expected."""


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_tokens(text: str) -> list[str]:
    """>>> split_tokens("Hi, you.\\n")
    ['Hi', ',', ' you', '.', '\\n']"""
    return _PIECE.findall(text)


def token_logprob(previous: str, piece: str) -> float:
    return -(0.02 + 3.0 * _unit("lp", previous, piece) ** 2)


class Pieces:
    """Per-response vocabulary: ids for the pieces of one response (``Detokenizer``)."""

    def __init__(self):
        self._texts: list[str] = []
        self._ids: dict[str, int] = {}

    def id(self, piece: str) -> int:
        if piece not in self._ids:
            self._ids[piece] = len(self._texts)
            self._texts.append(piece)
        return self._ids[piece]

    def token_text(self, token_id: int) -> str:
        return self._texts[token_id]


def _top(vocab: Pieces, previous: str, piece: str, logprob: float, k: int):
    """The k most likely (id, log-prob) of the piece and its made-up alternatives."""
    if k <= 0:
        return []
    lead = piece[: len(piece) - len(piece.lstrip())] or " "
    start = int(_unit("alt", previous, piece) * len(_WORDS))
    words = [_WORDS[(start + j) % len(_WORDS)] for j in range(len(_WORDS))]
    alts = list(dict.fromkeys(lead + w for w in words if lead + w != piece))[:k]
    rest = 1.0 - math.exp(logprob)
    options = [(piece, logprob)] + [
        (alt, math.log(max(rest * 0.5 ** (j + 1), 1e-30))) for j, alt in enumerate(alts)
    ]
    options.sort(key=lambda o: -o[1])
    return [(vocab.id(text), lp) for text, lp in options[:k]]


def generation(
    vocab: Pieces, text: str, max_tokens: int | None, top_k: int = 0, *, after: str = ""
) -> Generation:
    """``text`` as an answer sampled after the piece ``after``, cut at ``max_tokens`` pieces."""
    pieces = split_tokens(text)
    finish = "stop"
    if max_tokens is not None and len(pieces) > max_tokens:
        pieces, finish = pieces[:max_tokens], "length"
    lps, tops, previous = [], [], after
    for piece in pieces:
        lp = token_logprob(previous, piece)
        lps.append(lp)
        tops.append(_top(vocab, previous, piece, lp, top_k))
        previous = piece
    ids = [vocab.id(p) for p in pieces]
    return Generation(ids, lps, finish, "".join(pieces), tops if top_k else [])


def canned_answers(key: str, n: int, *, lead: str = "") -> list[str]:
    """``n`` distinct deterministic answers of 6-35 words for a request identified by ``key``."""
    answers = []
    for i in range(n):
        length = 6 + int(_unit("len", key, i) * 30)
        words = [_WORDS[int(_unit("w", key, i, j) * len(_WORDS))] for j in range(length)]
        answers.append(f"{lead}Answer {i + 1}: " + " ".join(words) + ".")
    return answers


# ---- judge ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgePrompt:
    prompt: str  # the Alpaca-formatted prompt shown above the responses
    responses: tuple[str, ...]

    @property
    def instruction(self) -> str:
        match = _INSTRUCTION.search(self.prompt)
        return (match.group(1) if match else self.prompt).strip()

    @property
    def close_ended(self) -> bool:
        return "### Input:" in self.prompt


def parse_judge_prompt(text: str) -> JudgePrompt:
    """Split a judge prompt into the shown prompt and responses; raise if it is not one.

    >>> p = parse_judge_prompt("P\\n\\n###Response 0:\\na\\n\\n###Response 1:\\nbb\\n\\n\\nRate.")
    >>> p.prompt, p.responses
    ('P', ('a', 'bb'))
    """
    parts = _HEADER.split(text)
    if len(parts) < 3:
        raise ScriptedRequestError("judge mode: no '\\n\\n###Response k:\\n' blocks in the prompt")
    indices = [int(k) for k in parts[1::2]]
    if indices != list(range(len(indices))):
        raise ScriptedRequestError(f"judge mode: response blocks numbered {indices}")
    texts = list(parts[2::2])
    end = texts[-1].rfind("\n\n\n")
    if end < 0:
        raise ScriptedRequestError("judge mode: no '\\n\\n\\n' before the instructions")
    texts[-1] = texts[-1][:end]
    return JudgePrompt(parts[0], tuple(texts))


def rank_texts(texts: list[str], rule: JudgeRule) -> list[int]:
    """Indices best first; of identical texts only the lowest index is kept.

    >>> rank_texts(["a", "ccc", "bb", "ccc"], "length")
    [1, 2, 0]
    """
    first = {}
    kept = [i for i, t in enumerate(texts) if first.setdefault(t, i) == i]
    if rule == "length":
        return sorted(kept, key=lambda i: (-len(texts[i]), i))
    if rule == "reverse_length":
        return sorted(kept, key=lambda i: (len(texts[i]), i))
    if rule == "index":
        return kept
    raise ValueError(f"unknown judge rule {rule!r}; known: {list(JUDGE_RULES)}")


def ranking_reply(judge: JudgePrompt, rule: JudgeRule, *, as_json: bool = False) -> str:
    """The judge's whole answer (see the module docstring for both formats)."""
    reference = REFERENCE_PREFIX + " ".join(judge.instruction.split())[:40]
    texts = [*judge.responses, reference]
    ranking = rank_texts(texts, rule)
    place = {i: p for p, i in enumerate(ranking)}
    twin = {t: i for i, t in reversed(list(enumerate(texts)))}  # text -> lowest index
    scores = {k: max(0, MAX_SCORE - place[twin[t]]) for k, t in enumerate(texts)}
    kind = "close-ended" if judge.close_ended else "open-ended"
    if as_json:
        body = {
            "instruction_type": kind,
            "reference_answer": reference,
            "scores": [{"response": k, "score": scores[k]} for k in sorted(ranking)],
            "ranking": ranking,
        }
        return json.dumps(body)
    lines = [f"The instruction is {kind}.", "", f"###Response {len(judge.responses)}:", reference]
    # A strong judge says which answers it dropped as duplicates; a ranking that leaves one out
    # without saying so is a parse failure (tuna_ray.ranking.contextual.parse_ranking).
    lines += [""] + [
        f"Response {k} is a duplicate of Response {twin[t]}."
        for k, t in enumerate(texts)
        if twin[t] != k
    ]
    lines += [""] + [f"Response {k}: {s}" for k, s in scores.items()]
    lines += ["", f"rank: [{', '.join(map(str, ranking))}]"]
    return "\n".join(lines)


_FASTCHAT_PAIR = re.compile(
    r"\[The Start of Assistant A's Answer\]\n(?P<a>.*)\n\[The End of Assistant A's Answer\]\n\n"
    r"\[The Start of Assistant B's Answer\]\n(?P<b>.*)\n\[The End of Assistant B's Answer\]\s*\Z",
    re.DOTALL,
)
_ALPACA_EVAL_PAIR = re.compile(
    r'"model": "model_1",\n\s*"answer": """(?P<a>.*)"""\n\s*\},\n\s*\{\n\s*'
    r'"model": "model_2",\n\s*"answer": """(?P<b>.*)"""\n\s*\}\n\]',
    re.DOTALL,
)


def pairwise_reply(text: str, rule: str) -> str | None:
    """A verdict for FastChat's pair-v2 or AlpacaEval's annotator prompt (None: neither).

    The two answers are ranked by ``rule`` like the contextual judge's responses (ties and
    ``index``: the answer shown first wins; identical answers: FastChat's tie ``[[C]]``,
    AlpacaEval -- which has no tie -- model_1)."""
    for name, pattern in (("fastchat", _FASTCHAT_PAIR), ("alpaca_eval", _ALPACA_EVAL_PAIR)):
        match = pattern.search(text)
        if match is None:
            continue
        ranking = rank_texts([match["a"], match["b"]], rule)
        if name == "fastchat":
            verdict = "C" if len(ranking) == 1 else "AB"[ranking[0]]
            return f"Scripted judge ({rule}). Final verdict: [[{verdict}]]"
        best = ranking[0]
        return repr(
            [{"model": f"model_{best + 1}", "rank": 1}, {"model": f"model_{2 - best}", "rank": 2}]
        )
    return None


# ---- request -> response body ---------------------------------------------------------------


class ScriptedBackend:
    """Bodies of ``/v1/chat/completions`` and ``/v1/completions`` for a scripted mode.

    ``delay_s`` is what each request should take; the server awaits it (``asyncio.sleep``) so
    requests overlap. Methods raise ``ScriptedRequestError`` for requests the mode cannot answer
    (judge mode answers only chat requests whose last user message is a judge prompt).
    """

    def __init__(self, mode: ScriptedMode, *, delay_s: float = 0.0, rule: JudgeRule = "length"):
        if mode not in ("fixed", "judge"):
            raise ValueError(f"unknown scripted mode {mode!r}")
        if rule not in JUDGE_RULES:
            raise ValueError(f"unknown judge rule {rule!r}; known: {list(JUDGE_RULES)}")
        self.mode, self.delay_s, self.rule = mode, delay_s, rule

    def chat(self, req: fmt.ChatRequest) -> dict:
        messages = req.plain_messages()
        max_tokens = req.max_completion_tokens or req.max_tokens or fmt.DEFAULT_CHAT_MAX_TOKENS
        if self.mode == "judge":
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise ScriptedRequestError("judge mode: the request has no user message")
            as_json = (req.response_format or {}).get("type") == "json_schema"
            reply = pairwise_reply(users[-1], self.rule)
            if reply is None:
                reply = ranking_reply(parse_judge_prompt(users[-1]), self.rule, as_json=as_json)
            texts = [reply]
            texts *= req.n
        else:
            key = json.dumps([messages, req.seed])
            texts = canned_answers(key, req.n)
        top = (req.top_logprobs or 0) if req.logprobs else 0
        vocab = Pieces()
        gens = [generation(vocab, t, max_tokens, top) for t in texts]
        prompt_tokens = sum(len(split_tokens(m["content"])) for m in messages)
        return fmt.chat_response(req.model, vocab, gens, prompt_tokens, logprobs=req.logprobs)

    def completions(self, req: fmt.CompletionRequest) -> dict:
        if self.mode == "judge":
            raise ScriptedRequestError("judge mode answers /v1/chat/completions only")
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p_index, text in enumerate(req.prompts()):
            vocab, top_k = Pieces(), req.logprobs or 0
            echo = self._echo(vocab, text, top_k)
            if req.max_tokens == 0:  # echo-only scoring: no generation
                gens = [Generation([], [], "length", "")] * req.n
            else:
                answers = canned_answers(json.dumps([text, req.seed]), req.n, lead=" ")
                last = split_tokens(text)[-1:] or [""]
                gens = [generation(vocab, a, req.max_tokens, top_k, after=last[0]) for a in answers]
            prompt_tokens += len(echo[0])
            for g_index, gen in enumerate(gens):
                logprobs = None
                if req.logprobs is not None:
                    logprobs = fmt.completion_logprobs(
                        vocab, text, gen, echo=echo if req.echo else None
                    )
                choices.append(
                    {
                        "index": p_index * req.n + g_index,
                        "text": (text if req.echo else "") + gen.text,
                        "logprobs": logprobs,
                        "finish_reason": gen.finish_reason,
                    }
                )
                completion_tokens += len(gen.token_ids)
        return fmt.completion_response(req.model, choices, prompt_tokens, completion_tokens)

    @staticmethod
    def _echo(vocab: Pieces, text: str, top_k: int):
        """(ids, log-probs with the first None, top-k, char starts) of the prompt's pieces."""
        pieces = split_tokens(text)
        ids, lps, tops, starts = [], [], [], []
        previous, position = "", 0
        for i, piece in enumerate(pieces):
            lp = token_logprob(previous, piece)
            ids.append(vocab.id(piece))
            lps.append(None if i == 0 else lp)
            tops.append(None if i == 0 else _top(vocab, previous, piece, lp, top_k))
            starts.append(position)
            previous, position = piece, position + len(piece)
        return ids, lps, tops, starts

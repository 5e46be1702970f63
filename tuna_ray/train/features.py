"""Training features: one joint tokenisation per candidate, with an explicit prompt boundary.

Pure core (no Ray): ``tokenize_candidates`` turns one ranked record into token ids for each of
its candidates. A training sequence is ``prompt + separator + response + EOS``; only response
tokens (EOS included) carry loss. The boundary comes from the character offsets of one joint
tokenisation, never from tokenising the prompt on its own (BPE merges across the boundary would
shift it). A token that straddles the boundary counts as a response token.

Truncation is explicit: sequences longer than ``max_length`` are cut at the end (the EOS is then
lost, the answer is unfinished); a candidate left with zero response tokens -- the prompt fills
the window -- is dropped and counted instead of dividing by zero as the reference code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenizedExample:
    """Token ids of the valid candidates of one record, best-first.

    >>> ex = TokenizedExample(input_ids=[[5, 6, 7, 2], [5, 6, 9, 9, 2]], prompt_len=[2, 2])
    >>> ex.num_response_tokens
    [2, 3]
    """

    input_ids: list[list[int]]
    prompt_len: list[int]
    num_truncated: int = 0
    num_dropped: int = 0
    kept_ranks: list[int] = field(default_factory=list)

    @property
    def num_response_tokens(self) -> list[int]:
        return [len(ids) - p for ids, p in zip(self.input_ids, self.prompt_len)]


def tokenize_candidates(
    prompt: str,
    responses: list[str],
    tokenizer,
    *,
    max_length: int,
    separator: str = "",
    add_special_tokens: bool = True,
) -> TokenizedExample:
    """Tokenise ``prompt + separator + response`` for each response, append EOS, truncate.

    Returns the surviving candidates in their original (best-first) order, with ``kept_ranks``
    naming which input positions they came from.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tuna-ray needs a fast (Rust) tokenizer: offsets mark the prompt boundary")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set one in its config")
    head = prompt + separator
    boundary = len(head)
    enc = tokenizer(
        [head + r for r in responses],
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
    )
    out = TokenizedExample(input_ids=[], prompt_len=[])
    for rank, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        # First token whose text ends past the boundary; special tokens have (0, 0) offsets and
        # belong to the prompt when they lead the sequence.
        prompt_len = next((i for i, (_, end) in enumerate(offsets) if end > boundary), len(ids))
        ids = list(ids) + [eos]
        if len(ids) > max_length:
            ids = ids[:max_length]
            out.num_truncated += 1
        if len(ids) - prompt_len <= 0:
            out.num_dropped += 1
            continue
        out.input_ids.append(ids)
        out.prompt_len.append(prompt_len)
        out.kept_ranks.append(rank)
    return out

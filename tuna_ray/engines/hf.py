"""The ``hf`` engine: a transformers causal LM sampling and scoring in-process (CPU or one GPU).

Stage: engines. Used by CPU tests, the embedded demo server (``tuna_ray.serve``) and small GPU
runs. Two choices fix what the numbers mean:

- **Raw log-probs.** The log-prob recorded for a sampled token is ``log_softmax`` of the model's
  *unprocessed* logits at that step (temperature 1, no top-p / top-k truncation), whatever the
  sampling parameters were. Tuna ranks answers by the teacher's likelihood, which is a property
  of the model, not of the sampler; it also makes ``sample`` and ``score`` agree on the same
  tokens (``score`` is a plain forward pass).
- **EOS is not an answer token.** Generation stops at EOS (or a stop string, or ``max_tokens``);
  the EOS token is left out of ``text`` and of ``token_logprobs``, as the OpenAI API leaves the
  stop sequence out. ``score`` likewise sums the answer's tokens without a trailing EOS, so the
  two engines' numbers compare. (The training loss adds EOS itself, see train/features.py.)

Prompts arrive rendered (``Prompt.text``, tokenised with the tokenizer's special tokens unless
the text already starts with BOS, as chat-template text may); a prompt with only ``messages``
goes through the tokenizer's chat template with the generation prompt appended. Sampling is
batched with left padding; ``params.seed`` seeds each batch (``seed + batch index``), so results
are reproducible for the same prompts, batch size and device.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from tuna_ray.engines.base import EngineError, Prompt, Sample, SamplingParams, Scored, Usage
from tuna_ray.models import resolve_model
from tuna_ray.train.features import tokenize_candidates


@dataclass
class Generation:
    """One sampled continuation with token-level detail (what the server's logprobs need)."""

    token_ids: list[int]
    token_logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    text: str
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token


@dataclass
class PromptGenerations:
    prompt_ids: list[int]
    generations: list[Generation]


class HFEngine:
    """Engine over a transformers model folder or hub id (``builtin:<name>`` also resolves)."""

    def __init__(
        self,
        model_name_or_path: str,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        batch_size: int = 8,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"hf:{model_name_or_path}"
        self.path = resolve_model(model_name_or_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        self.model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs).to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        if not eos:
            raise ValueError(f"{model_name_or_path}: neither model nor tokenizer names an EOS")
        self.eos_ids = sorted(set(eos))
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0]
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._usage = Usage()
        self._lock = threading.RLock()  # one request at a time per model

    # ---- prompts and tokens ------------------------------------------------------------------

    def render(self, prompt: Prompt) -> tuple[str, bool]:
        """The prompt's text and whether tokenising it should add special tokens."""
        if prompt.text is not None:
            return prompt.text, self._add_special_tokens(prompt.text)
        if prompt.messages:
            text = self.tokenizer.apply_chat_template(
                list(prompt.messages), add_generation_prompt=True, tokenize=False
            )
            return text, False
        raise EngineError("prompt has neither text nor messages", prompt_id=prompt.id)

    def _add_special_tokens(self, text: str) -> bool:
        # Text rendered by a chat template may already begin with BOS: do not add another.
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def encode(self, prompt: Prompt) -> list[int]:
        text, special = self.render(prompt)
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise EngineError("prompt is empty after tokenisation", prompt_id=prompt.id)
        if self.max_positions and len(ids) >= self.max_positions:
            raise EngineError(
                f"prompt has {len(ids)} tokens, the model takes {self.max_positions}",
                prompt_id=prompt.id,
            )
        return ids

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def char_starts(self, text: str, ids: list[int]) -> list[int]:
        """Where each token of ``text`` (tokenised as ``ids``) starts, in characters."""
        special = self._add_special_tokens(text)
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        if enc["input_ids"] == list(ids):
            return [start for start, _ in enc["offset_mapping"]]
        starts, position = [], 0  # chat-rendered text: fall back to decoded lengths
        for token_id in ids:
            starts.append(position)
            position += len(self.token_text(token_id))
        return starts

    # ---- sampling ----------------------------------------------------------------------------

    def sample(
        self, prompts: list[Prompt], params: SamplingParams
    ) -> list[list[Sample] | EngineError]:
        out: list[list[Sample] | EngineError] = []
        for result in self.generate(prompts, params):
            if isinstance(result, EngineError):
                out.append(result)
            else:
                out.append(
                    [Sample(g.text, g.token_logprobs, g.finish_reason) for g in result.generations]
                )
        return out

    def generate(
        self, prompts: list[Prompt], params: SamplingParams, *, top_logprobs: int = 0
    ) -> list[PromptGenerations | EngineError]:
        """``params.n`` continuations per prompt with token ids, raw log-probs and top-k."""
        results: list[PromptGenerations | EngineError | None] = [None] * len(prompts)
        encoded: list[tuple[int, list[int]]] = []
        for i, prompt in enumerate(prompts):
            try:
                encoded.append((i, self.encode(prompt)))
            except EngineError as exc:
                results[i] = exc
        with self._lock:
            for b in range(0, len(encoded), self.batch_size):
                batch = encoded[b : b + self.batch_size]
                seed = None if params.seed is None else params.seed + b // self.batch_size
                try:
                    gens = self._generate_batch(
                        [ids for _, ids in batch], params, seed, top_logprobs
                    )
                except Exception:  # noqa: BLE001 - retry its prompts alone, to find the bad one
                    gens = [
                        self._generate_alone(prompts[i], ids, params, seed, top_logprobs)
                        for i, ids in batch
                    ]
                for (i, ids), g in zip(batch, gens):
                    results[i] = g if isinstance(g, EngineError) else PromptGenerations(ids, g)
                    self._usage.requests += 1
                    if not isinstance(g, EngineError):
                        self._usage.prompt_tokens += len(ids)
                        self._usage.completion_tokens += sum(len(x.token_ids) for x in g)
        return results  # type: ignore[return-value]

    def _generate_alone(self, prompt, ids, params, seed, top_logprobs):
        try:
            return self._generate_batch([ids], params, seed, top_logprobs)[0]
        except Exception as exc:  # noqa: BLE001 - one bad prompt must not fail the others
            kind = type(exc).__name__
            self._usage.failures[kind] = self._usage.failures.get(kind, 0) + 1
            return EngineError(f"generation failed: {exc!r}", prompt_id=prompt.id)

    def _generate_batch(
        self, batch: list[list[int]], params: SamplingParams, seed: int | None, top_k: int
    ) -> list[list[Generation]]:
        from transformers import GenerationConfig

        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in batch])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
        do_sample = params.temperature > 0
        # Greedy decoding gives one answer; n greedy samples are copies of it.
        per_prompt = params.n if do_sample else 1
        max_new = params.max_tokens
        if self.max_positions:
            max_new = max(1, min(max_new, self.max_positions - width))
        config = GenerationConfig(
            do_sample=do_sample,
            temperature=params.temperature if do_sample else None,
            top_p=params.top_p if do_sample else None,
            top_k=0 if do_sample else None,  # sample from the full (top-p) distribution
            max_new_tokens=max_new,
            num_return_sequences=per_prompt,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
            stop_strings=list(params.stop) or None,
        )
        extra = {"tokenizer": self.tokenizer} if params.stop else {}
        with _seeded(seed, self.device), torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=config,
                **extra,
            )
        new_tokens = out.sequences[:, width:].tolist()
        chosen_lp: list[list[float]] = [[] for _ in new_tokens]
        tops: list[list[list[tuple[int, float]]]] = [[] for _ in new_tokens]
        for step, logits in enumerate(out.logits):
            logp = torch.log_softmax(logits.float(), dim=-1)
            ids = out.sequences[:, width + step].to(logp.device)
            picked = logp.gather(1, ids[:, None])[:, 0].tolist()
            if top_k:
                values, indices = logp.topk(top_k, dim=-1)
                top_rows = [
                    list(zip(r_i, r_v)) for r_i, r_v in zip(indices.tolist(), values.tolist())
                ]
            for row in range(len(new_tokens)):
                chosen_lp[row].append(picked[row])
                if top_k:
                    tops[row].append(top_rows[row])
        gens = [
            self._finish(new_tokens[r], chosen_lp[r], tops[r], params.stop)
            for r in range(len(new_tokens))
        ]
        grouped = [gens[i * per_prompt : (i + 1) * per_prompt] for i in range(len(batch))]
        if per_prompt != params.n:
            grouped = [g * params.n for g in grouped]
        return grouped

    def _finish(self, ids, logprobs, tops, stop) -> Generation:
        """Cut at the first EOS (excluded) or stop string (excluded from the text)."""
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        reason = "length" if end is None else "stop"
        ids = ids[:end]
        text = self.tokenizer.decode(ids)
        cuts = [text.find(s) for s in stop if s and s in text]
        if cuts:
            reason, cut = "stop", min(cuts)
            text = text[:cut]
            # Keep the tokens that make up the kept text; a token straddling the stop stays.
            keep = next(
                (k for k in range(len(ids) + 1) if len(self.tokenizer.decode(ids[:k])) >= cut),
                len(ids),
            )
            ids = ids[:keep]
        n = len(ids)
        return Generation(ids, logprobs[:n], reason, text, tops[:n] if tops else [])

    # ---- scoring -----------------------------------------------------------------------------

    def score(self, prompt: Prompt, responses: list[str]) -> list[Scored] | EngineError:
        """Summed raw log-prob of each response's tokens (no EOS) after the prompt."""
        try:
            text, special = self.render(prompt)
            enc = tokenize_candidates(
                text, responses, self.tokenizer, max_length=10**9, add_special_tokens=special
            )
        except EngineError as exc:
            return exc
        # Drop the EOS tokenize_candidates appends: sample() leaves EOS out as well.
        seqs = [ids[:-1] for ids in enc.input_ids]
        if any(p == 0 for p in enc.prompt_len):
            return EngineError(
                "empty prompt: the first answer token has no context", prompt_id=prompt.id
            )
        if self.max_positions and any(len(s) > self.max_positions for s in seqs):
            return EngineError(
                f"prompt + answer exceed the model's {self.max_positions} positions",
                prompt_id=prompt.id,
            )
        with self._lock:
            scored = []
            for b in range(0, len(seqs), self.batch_size):
                chunk = seqs[b : b + self.batch_size]
                lps, _ = self.token_logprobs(chunk)
                for token_lps, prompt_len in zip(lps, enc.prompt_len[b : b + self.batch_size]):
                    answer = token_lps[prompt_len:]
                    scored.append(Scored(float(sum(answer)), len(answer)))
            self._usage.requests += 1
            self._usage.prompt_tokens += sum(len(s) for s in seqs)
        return scored

    def token_logprobs(
        self, seqs: list[list[int]], *, top_k: int = 0
    ) -> tuple[list[list[float | None]], list[list[list[tuple[int, float]] | None]]]:
        """One forward pass: the log-prob of every token given its prefix (the first is None),
        and per position the ``top_k`` (id, log-prob) alternatives (empty lists if 0)."""
        with self._lock, torch.no_grad():
            width = max(len(s) for s in seqs)
            input_ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits
            lps, tops = [], []
            for row, s in enumerate(seqs):
                logp = torch.log_softmax(logits[row, : len(s) - 1].float(), dim=-1)
                target = torch.tensor(s[1:], device=logp.device)[:, None]
                lps.append([None] + logp.gather(1, target)[:, 0].tolist())
                top: list = []
                if top_k:
                    v, i = logp.topk(top_k, dim=-1)
                    top = [None] + [list(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]
                tops.append(top)
        return lps, tops

    def usage(self) -> Usage:
        return self._usage


class _seeded:
    """Seed torch's RNG for one block and restore the caller's RNG state afterwards."""

    def __init__(self, seed: int | None, device: torch.device):
        self.seed = seed
        self.devices = [device.index or 0] if device.type == "cuda" else []
        self._fork = None

    def __enter__(self):
        if self.seed is not None:
            self._fork = torch.random.fork_rng(devices=self.devices)
            self._fork.__enter__()
            torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        if self._fork is not None:
            self._fork.__exit__(*exc)

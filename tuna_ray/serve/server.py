"""``tuna-ray serve``: a local OpenAI-compatible server: a transformers model, or scripted.

Stage: serve. For the embedded demo (teacher / judge without a cloud endpoint) and for tests of
the ``openai`` engine, which talk to it over real HTTP. Endpoints:

- ``GET /v1/models``; ``POST /v1/completions`` (``prompt`` string or list, ``n``, ``max_tokens``,
  ``temperature``, ``top_p``, ``seed``, ``stop``, ``logprobs=k``, ``echo``; ``echo`` with
  ``max_tokens=0`` returns the prompt's token log-probs, first one null: re-scoring given
  answers); ``POST /v1/chat/completions`` (``messages`` through the chat template, ``logprobs``,
  ``top_logprobs``, ``max_tokens`` / ``max_completion_tokens``).
- ``GET /admin/stats`` -> ``{"requests", "by_path", "faults", "first_request_at",
  "last_request_at", "max_in_flight"}`` counting inference POSTs (receive times are
  ``time.time()``, null before the first; ``max_in_flight``: most POSTs being served at once);
  ``POST /admin/reset`` zeroes it and re-seeds the fault sequence; ``GET|POST /admin/faults``
  reads / replaces the fault configuration (see faults.py) without a restart.

Modes (``--mode``), all with the same endpoints, stats and fault injection:

- ``model`` (default): ``--model`` through ``HFEngine``. Log-probs are the model's raw ones and
  EOS is never part of an answer (see engines/hf.py). Requests run one at a time (the
  engine's lock).
- ``fixed``: canned answers with made-up but deterministic log-probs, after ``--fixed-delay-s``
  (awaited, so requests overlap): a stand-in teacher for client benchmarks and tests.
- ``judge``: a scripted contextual-ranking judge (``--judge-rule``) that parses the paper's
  judge prompt and answers in the paper's format, or as JSON when ``response_format`` is a
  json_schema. Both scripted modes are described in scripted.py.

It binds to 127.0.0.1 unless told otherwise.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint annotations at runtime
# and the fastapi names are imported inside create_app.
import argparse
import asyncio
import sys
import threading
import time
from collections import Counter

from tuna_ray.engines.base import EngineError, Prompt, SamplingParams
from tuna_ray.engines.hf import Generation
from tuna_ray.serve import openai_format as fmt
from tuna_ray.serve.faults import (
    EARLY_FAULTS,
    FAULT_KINDS,
    FaultConfig,
    FaultInjector,
    send_early_fault,
)
from tuna_ray.serve.scripted import JUDGE_RULES, ScriptedBackend, ScriptedRequestError

INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions")
FAULT_SCOPE_KEY = "tuna_ray.fault"


class RequestStats:
    """Inference POSTs seen by the server (admin calls excluded), for tests to count retries
    and benchmarks to measure the arrival rate (wall-clock receive times, ``time.time()``)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.by_path: Counter[str] = Counter()
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    def record(self, path: str) -> None:
        now = time.time()
        with self._lock:
            self.by_path[path] += 1
            if self.first_request_at is None:
                self.first_request_at = now
            self.last_request_at = now

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "requests": sum(self.by_path.values()),
                "by_path": dict(self.by_path),
                "first_request_at": self.first_request_at,
                "last_request_at": self.last_request_at,
                "max_in_flight": self.max_in_flight,
            }

    def reset(self) -> None:
        with self._lock:
            self.by_path.clear()
            self.first_request_at = self.last_request_at = None
            self.max_in_flight = self.in_flight


class FaultsAndStats:
    """ASGI middleware: count each POST, then maybe answer it with an injected fault."""

    def __init__(self, app, stats: RequestStats, faults: FaultInjector):
        self.app, self.stats, self.faults = app, stats, faults

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or path.startswith("/admin/"):
            return await self.app(scope, receive, send)
        self.stats.record(path)
        self.stats.enter()
        try:
            kind = self.faults.draw() if path in INFERENCE_PATHS else None
            if kind in EARLY_FAULTS:
                return await send_early_fault(kind, self.faults.config, send)
            if kind == "slow":
                await asyncio.sleep(self.faults.config.slow_seconds)
            scope[FAULT_SCOPE_KEY] = kind
            await self.app(scope, receive, send)
        finally:
            self.stats.leave()


class _Shell:
    """What every mode shares: the FastAPI app with /v1/models and /admin/*, request checks,
    OpenAI-style errors and the ``no_logprobs`` fault. Modes add the two inference routes."""

    def __init__(self, known_models: set[str], served_model_name: str, faults: FaultInjector):
        from fastapi import FastAPI
        from fastapi.exceptions import RequestValidationError

        self.known_models, self.faults = known_models, faults
        self.stats = RequestStats()
        self.app = app = FastAPI(title="tuna-ray local OpenAI-compatible server")

        @app.exception_handler(RequestValidationError)
        async def _bad_request(_request, exc):
            return self.error(400, f"invalid request: {exc.errors()}")

        @app.get("/v1/models")
        def list_models():
            card = {
                "id": served_model_name,
                "object": "model",
                "created": 0,
                "owned_by": "tuna-ray",
            }
            return {"object": "list", "data": [card]}

        @app.get("/admin/stats")
        def get_stats():
            return {**self.stats.snapshot(), "faults": dict(faults.counts)}

        @app.post("/admin/reset")
        def reset():
            self.stats.reset()
            faults.reset()
            return {"ok": True}

        @app.get("/admin/faults")
        def get_faults():
            return faults.config.model_dump()

        @app.post("/admin/faults")
        def set_faults(config: FaultConfig):
            faults.configure(config)
            return faults.config.model_dump()

    @staticmethod
    def error(status: int, message: str, type_: str = "invalid_request_error", **kw):
        from fastapi.responses import JSONResponse

        return JSONResponse(fmt.error_body(message, type_, **kw), status_code=status)

    def check(self, req):
        """An error response for a request no mode answers, else None."""
        if req.model not in self.known_models:
            return self.error(404, f"model {req.model!r} not served", code="model_not_found")
        if req.stream:
            return self.error(400, "stream=true is not supported by tuna-ray serve", param="stream")
        return None

    @staticmethod
    def finish(request, body: dict):
        from fastapi.responses import JSONResponse

        if request.scope.get(FAULT_SCOPE_KEY) == "no_logprobs":
            body = fmt.strip_logprobs(body)
        return JSONResponse(body)

    def asgi(self):
        return FaultsAndStats(self.app, self.stats, self.faults)


def create_app(engine, *, served_model_name: str, faults: FaultInjector | None = None):
    """The FastAPI app around ``engine`` (an ``HFEngine`` or anything with its surface)."""
    from fastapi import Request

    known_models = {served_model_name, engine.name, engine.name.removeprefix("hf:")}
    known_models.add(str(getattr(engine, "path", served_model_name)))
    shell = _Shell(known_models, served_model_name, faults or FaultInjector())
    app, error = shell.app, shell.error

    def sampling(req, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            max_tokens=max_tokens,
            seed=req.seed,
            stop=req.stop_strings(),
        )

    @app.post("/v1/completions")
    def completions(req: fmt.CompletionRequest, request: Request):
        if (bad := shell.check(req)) is not None:
            return bad
        texts = req.prompts()
        prompts = [Prompt(id=f"prompt-{i}", text=t) for i, t in enumerate(texts)]
        if req.max_tokens == 0:  # echo-only scoring: no generation
            try:
                results = [(engine.encode(p), [_empty()] * req.n) for p in prompts]
            except EngineError as exc:
                return error(400, exc.reason, param="prompt")
        else:
            out = engine.generate(
                prompts, sampling(req, req.max_tokens or 16), top_logprobs=req.logprobs or 0
            )
            if bad := next((r for r in out if isinstance(r, EngineError)), None):
                return error(400, bad.reason, param="prompt")
            results = [(r.prompt_ids, r.generations) for r in out]
        choices, completion_tokens = [], 0
        for p_index, (text, (prompt_ids, gens)) in enumerate(zip(texts, results)):
            echo = None
            if req.echo and req.logprobs is not None:
                lps, tops = engine.token_logprobs([prompt_ids], top_k=req.logprobs)
                echo = (prompt_ids, lps[0], tops[0], engine.char_starts(text, prompt_ids))
            for g_index, gen in enumerate(gens):
                logprobs = None
                if req.logprobs is not None:
                    logprobs = fmt.completion_logprobs(engine, text, gen, echo=echo)
                choice = {
                    "index": p_index * req.n + g_index,
                    "text": (text if req.echo else "") + gen.text,
                    "logprobs": logprobs,
                    "finish_reason": gen.finish_reason,
                }
                choices.append(choice)
                completion_tokens += len(gen.token_ids)
        prompt_tokens = sum(len(ids) for ids, _ in results)
        return shell.finish(
            request, fmt.completion_response(req.model, choices, prompt_tokens, completion_tokens)
        )

    @app.post("/v1/chat/completions")
    def chat_completions(req: fmt.ChatRequest, request: Request):
        if (bad := shell.check(req)) is not None:
            return bad
        prompt = Prompt(id="chat", messages=req.plain_messages())
        max_tokens = req.max_completion_tokens or req.max_tokens or fmt.DEFAULT_CHAT_MAX_TOKENS
        top = (req.top_logprobs or 0) if req.logprobs else 0
        (result,) = engine.generate([prompt], sampling(req, max_tokens), top_logprobs=top)
        if isinstance(result, EngineError):
            return error(400, result.reason, param="messages")
        body = fmt.chat_response(
            req.model, engine, result.generations, len(result.prompt_ids), logprobs=req.logprobs
        )
        return shell.finish(request, body)

    return shell.asgi()


def create_scripted_app(
    backend: ScriptedBackend, *, served_model_name: str, faults: FaultInjector | None = None
):
    """The app for ``--mode fixed|judge``: async routes, so requests overlap during the delay."""
    from fastapi import Request

    shell = _Shell({served_model_name}, served_model_name, faults or FaultInjector())

    async def answer(request: Request, build, req, param: str):
        if (bad := shell.check(req)) is not None:
            return bad
        if backend.delay_s > 0:
            await asyncio.sleep(backend.delay_s)
        try:
            return shell.finish(request, build(req))
        except ScriptedRequestError as exc:
            return shell.error(400, str(exc), param=param)

    @shell.app.post("/v1/completions")
    async def completions(req: fmt.CompletionRequest, request: Request):
        return await answer(request, backend.completions, req, "prompt")

    @shell.app.post("/v1/chat/completions")
    async def chat_completions(req: fmt.ChatRequest, request: Request):
        return await answer(request, backend.chat, req, "messages")

    return shell.asgi()


def _empty() -> Generation:
    return Generation(token_ids=[], token_logprobs=[], finish_reason="length", text="")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="HF folder, hub id or builtin:<name> (required in model mode)"
    )
    parser.add_argument(
        "--served-model-name", help="name clients use (default: --model, else the mode)"
    )
    parser.add_argument(
        "--mode",
        choices=["model", "fixed", "judge"],
        default="model",
        help="model: a transformers model; fixed: canned answers; judge: scripted ranking judge",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8)
    scripted = parser.add_argument_group("scripted modes (fixed, judge)")
    scripted.add_argument(
        "--fixed-delay-s", type=float, default=0.0, help="seconds each request takes"
    )
    scripted.add_argument("--judge-rule", choices=JUDGE_RULES, default="length")
    faults = parser.add_argument_group("fault injection (tests)")
    faults.add_argument("--fault-rate", type=float, default=0.0)
    faults.add_argument("--fault-kinds", default=",".join(FAULT_KINDS))
    faults.add_argument("--fault-seed", type=int, default=0)
    faults.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--log-level", default="warning")


def main(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    try:
        fault_config = FaultConfig(
            rate=args.fault_rate,
            kinds=args.fault_kinds,
            seed=args.fault_seed,
            slow_seconds=args.slow_seconds,
        )
    except ValidationError as exc:
        print(f"tuna-ray serve: error: {exc}", file=sys.stderr)
        return 2
    faults = FaultInjector(fault_config)
    if args.mode == "model":
        from tuna_ray.engines.hf import HFEngine

        if not args.model:
            print("tuna-ray serve: error: --mode model needs --model", file=sys.stderr)
            return 2
        engine = HFEngine(
            args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size
        )
        app = create_app(
            engine, served_model_name=args.served_model_name or args.model, faults=faults
        )
    else:
        if args.fixed_delay_s < 0:
            print("tuna-ray serve: error: --fixed-delay-s must be >= 0", file=sys.stderr)
            return 2
        backend = ScriptedBackend(args.mode, delay_s=args.fixed_delay_s, rule=args.judge_rule)
        name = args.served_model_name or args.model or args.mode
        app = create_scripted_app(backend, served_model_name=name, faults=faults)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    _serve(config)
    return 0


def _serve(config) -> None:
    """Run uvicorn; print one 'listening on' line (with the real port) once it accepts."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and self.servers:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"tuna-ray serve: listening on http://{host}:{port}", flush=True)

    AnnouncingServer(config).run()

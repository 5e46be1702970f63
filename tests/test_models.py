"""Model resolution: builtin names, and model folders in object storage staged to the node."""

from __future__ import annotations

import pytest

from tuna_ray import models, storage


def test_model_folder_on_s3_is_staged_once_per_content(tmp_path, monkeypatch, s3_server):
    monkeypatch.setenv("TUNA_RAY_NODE_CACHE", str(tmp_path / "node"))
    uri = s3_server.new_bucket() + "/run/train_p/hf_model"
    storage.write_text(storage.join(uri, "config.json"), '{"a": 1}')
    storage.write_text(storage.join(uri, "sub", "tokenizer.json"), "{}")
    downloads = []
    real = storage.download_dir
    monkeypatch.setattr(storage, "download_dir", lambda *a: (downloads.append(a), real(*a)))

    local = models.resolve_model(uri)
    assert local.startswith(str(tmp_path / "node" / "models"))
    assert (
        storage.read_text(f"{local}/config.json"),
        storage.read_text(f"{local}/sub/tokenizer.json"),
    ) == ('{"a": 1}', "{}")
    assert models.resolve_model(uri) == local and len(downloads) == 1  # reused

    storage.write_text(storage.join(uri, "config.json"), '{"a": 22}')  # retrained in place
    newer = models.resolve_model(uri)
    assert newer != local and storage.read_text(f"{newer}/config.json") == '{"a": 22}'


def test_missing_model_folder_is_named(s3_server):
    uri = s3_server.new_bucket() + "/nothing/hf_model"
    with pytest.raises(FileNotFoundError, match=f"no model folder at {uri}"):
        models.resolve_model(uri)


def test_hub_ids_and_local_paths_pass_through():
    assert models.resolve_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert models.resolve_model("/models/x") == "/models/x"
    with pytest.raises(ValueError, match="unknown builtin model"):
        models.resolve_model("builtin:nope")

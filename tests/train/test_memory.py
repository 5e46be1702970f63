"""The shipped 7B configs fit the machines they name (tuna_ray/train/memory.py)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.support import REPO
from tuna_ray.config import load_config
from tuna_ray.pipeline import PipelineConfig
from tuna_ray.train.memory import GB, LLAMA_7B, ModelShape, estimate_gpu_memory

A100_40GB = 40 * 2**30  # what p4d.24xlarge / a2-highgpu-8g give per GPU
SEVEN_B_CONFIGS = ["llama-7b-8gpu.yaml", "llama-7b-2x8gpu.yaml"]


def test_estimate_by_hand():
    shape = ModelShape(params=1e9, layers=2, hidden=10, intermediate=20, vocab=100)
    e = estimate_gpu_memory(
        shape, world=4, zero_stage=3, micro_batch=1, num_candidates=2, max_length=5
    )
    tokens = 10
    assert e.model_states == 2e9 / 4 + 16e9 / 4
    assert e.gathered_weights == 2e9
    assert e.activations == 2 * tokens * 10 * 2 + 2 * tokens * (6 * 10 + 3 * 20) * 2
    assert e.output_head == 2 * tokens * 100 * 4
    offloaded = estimate_gpu_memory(
        shape,
        world=4,
        zero_stage=3,
        micro_batch=1,
        num_candidates=2,
        max_length=5,
        offload_optimizer=True,
        offload_params=True,
    )
    assert offloaded.model_states == 0
    zero2 = estimate_gpu_memory(
        shape, world=4, zero_stage=2, micro_batch=1, num_candidates=2, max_length=5
    )
    assert zero2.model_states == 2e9 + 16e9 / 4 and zero2.gathered_weights == 0


def _a100_node_types() -> dict[str, dict]:
    """The launchers' node types that carry the A100 label, by file."""
    out = {}
    for name in ("aws.yaml", "gcp.yaml"):
        types = yaml.safe_load((REPO / "cluster" / name).read_text())["available_node_types"]
        out[name] = {k: v for k, v in types.items() if "accelerator_type:A100" in v["resources"]}
    return out


@pytest.mark.parametrize("name", SEVEN_B_CONFIGS)
def test_seven_b_config_fits_the_a100_40gb_nodes_it_pins(name):
    path = REPO / "jobs" / "configs" / name
    cfg = load_config(path, [], PipelineConfig)
    assert cfg.scaling.use_gpu and cfg.scaling.accelerator_type == "A100"
    n = cfg.probabilistic["sampling"]["n"]
    totals = set()
    for phase in (cfg.train_p, cfg.train_c):
        assert phase.zero_stage == 3 and not phase.offload_optimizer and not phase.offload_params
        estimate = estimate_gpu_memory(
            LLAMA_7B,
            world=cfg.scaling.num_workers,
            zero_stage=phase.zero_stage,
            micro_batch=phase.micro_batch_size,
            num_candidates=n,
            max_length=phase.max_length,
            gradient_checkpointing=phase.gradient_checkpointing,
        )
        assert estimate.total < 0.8 * A100_40GB, estimate.table()  # 20 % headroom
        totals.add(round(estimate.total / GB, 1))
    # The figure the config states is the estimate of what it configures.
    stated = re.search(r"~(\d+\.\d) GB of 40 GB", path.read_text())
    assert stated and {float(stated.group(1))} == totals
    # The launchers' A100 types are 40 GB parts, labelled so the pinned run lands on them only.
    for file, types in _a100_node_types().items():
        assert len(types) == 1, file
        node = next(iter(types.values()))
        machine = node["node_config"].get("InstanceType") or node["node_config"]["machineType"]
        assert machine in ("p4d.24xlarge", "a2-highgpu-8g"), (file, machine)

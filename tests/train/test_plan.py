"""Which samples make up each step: fixed by the global order, not by workers or restarts."""

from __future__ import annotations

import pytest

from tuna_ray.config import TrainConfig
from tuna_ray.train.dataset import global_order, rank_of
from tuna_ray.train.deepspeed_config import build_deepspeed_config, resolve_precision
from tuna_ray.train.loop import step_slices
from tuna_ray.train.trainer import plan_steps


def _rank_rows(rows: list[dict], rank: int, world: int, g: int) -> list[dict]:
    """What split_by_rank hands a rank: its rows, each with its global position."""
    return [
        {**r, "position": q}
        for q, r in enumerate(rows)
        if rank_of(q, global_batch=g, world=world) == rank
    ]


@pytest.mark.parametrize("world,mb,gas", [(1, 4, 1), (2, 1, 2), (3, 2, 2)])
def test_step_slices_partition_the_stream(world, mb, gas):
    g = world * mb * gas
    total = 50 // g
    rows = [{"id": f"r{i}"} for i in range(total * g)]
    per_step: dict[int, list[str]] = {}
    for rank in range(world):
        for step, micro_batches in step_slices(
            iter(_rank_rows(rows, rank, world, g)),
            micro_batch=mb,
            grad_accum=gas,
            global_batch=g,
            start_step=0,
            total_steps=total,
        ):
            assert len(micro_batches) == gas and all(len(m) == mb for m in micro_batches)
            per_step.setdefault(step, []).extend(r["id"] for m in micro_batches for r in m)
    assert sorted(per_step) == list(range(total))
    for step, ids in per_step.items():
        assert sorted(ids) == sorted(f"r{i}" for i in range(step * g, (step + 1) * g))


def test_step_slices_resume_skips_exactly_the_consumed_steps():
    rows = _rank_rows([{"id": i} for i in range(40)], rank=1, world=2, g=4)
    kw = {"micro_batch": 2, "grad_accum": 1, "global_batch": 4, "total_steps": 10}
    full = dict(step_slices(iter(rows), start_step=0, **kw))
    resumed = dict(step_slices(iter(rows), start_step=6, **kw))
    assert sorted(resumed) == [6, 7, 8, 9]
    assert all(resumed[s] == full[s] for s in resumed)


def test_step_slices_refuses_a_short_step():
    rows = _rank_rows([{"id": i} for i in range(6)], rank=0, world=1, g=4)
    with pytest.raises(RuntimeError, match="step 1 got 2 of 4 rows"):
        list(
            step_slices(
                iter(rows),
                micro_batch=2,
                grad_accum=2,
                global_batch=4,
                start_step=0,
                total_steps=2,
            )
        )


def test_plan_steps_drops_only_the_incomplete_tail():
    assert plan_steps(50, micro_batch=2, grad_accum=2, world=2, max_steps=None) == (6, 2)
    assert plan_steps(48, micro_batch=2, grad_accum=2, world=2, max_steps=None) == (6, 0)
    assert plan_steps(48, micro_batch=2, grad_accum=2, world=2, max_steps=4)[0] == 4


def test_global_order_is_a_seeded_permutation_per_epoch():
    order = global_order(10, epochs=3, seed=7)
    assert [sorted(order[i * 10 : (i + 1) * 10]) for i in range(3)] == [list(range(10))] * 3
    assert order[:10] != order[10:20]  # each epoch reshuffles
    assert order == global_order(10, epochs=3, seed=7) != global_order(10, epochs=3, seed=8)


def test_deepspeed_config_follows_train_config():
    tc = TrainConfig(
        zero_stage=3,
        offload_optimizer=True,
        offload_params=True,
        micro_batch_size=3,
        gradient_accumulation_steps=5,
    )
    cfg = build_deepspeed_config(tc, precision="bf16")
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 5
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert "bf16" not in build_deepspeed_config(TrainConfig(), precision="fp32")
    # The paper's default: no gradient clipping (the reference config has no such key).
    assert "gradient_clipping" not in build_deepspeed_config(TrainConfig(), precision="fp32")
    clipped = TrainConfig(optim={"max_grad_norm": 1.0})
    assert build_deepspeed_config(clipped, precision="fp32")["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="zero_stage=3"):
        build_deepspeed_config(TrainConfig(zero_stage=2, offload_params=True), precision="fp32")


def test_precision_resolution():
    assert resolve_precision(TrainConfig(), on_gpu=False, bf16_supported=False) == "fp32"
    assert resolve_precision(TrainConfig(), on_gpu=True, bf16_supported=True) == "bf16"
    assert resolve_precision(TrainConfig(), on_gpu=True, bf16_supported=False) == "fp16"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_precision(TrainConfig(precision="bf16"), on_gpu=False, bf16_supported=False)

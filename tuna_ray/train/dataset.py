"""Ray Data shell of the training data path: records -> tokenised, ordered, materialised dataset.

Input records are ranked records (tuna_ray.data.records): ``id``, ``instruction``/``input`` or a
rendered ``prompt``, ``responses`` best-first. Output columns, one row per (epoch, instruction):

    id: str, sample_index: int64 (position in the run's global sample order),
    input_ids: list[list[int32]] (valid candidates, best-first), prompt_len: list[int32],
    num_candidates: int32, num_truncated: int32, num_dropped: int32
    (+ ``position``, ``rank`` after ``split_by_rank``)

The global order (a seeded permutation per epoch) is fixed here, on the driver, so which samples
make up step k never depends on how many workers read them or when they restart: a resumed run
skips exactly the samples consumed before its checkpoint. Tokenisation runs on an actor pool
over the cluster's CPUs; ``split_by_rank`` then gives each training worker its own dataset.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from tuna_ray.data.templates import render_prompt, response_separator


class TokenizeRanked:
    """Ray Data UDF. Expects: id, instruction, input, prompt, responses. Returns: see module."""

    def __init__(
        self,
        model_path: str,
        template: str,
        system_prompt: str | None,
        max_length: int,
        max_candidates: int | None,
    ):
        from transformers import AutoTokenizer

        from tuna_ray.models import resolve_model

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_path))
        self.template = template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.max_candidates = max_candidates

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from tuna_ray.train.features import tokenize_candidates

        out: dict[str, list] = {
            k: []
            for k in (
                "id",
                "sample_index",
                "input_ids",
                "prompt_len",
                "num_candidates",
                "num_truncated",
                "num_dropped",
            )
        }
        for i in range(len(batch["id"])):
            instruction = batch["instruction"][i]
            if instruction:  # render with our template; imported records carry a rendered prompt
                prompt = render_prompt(
                    instruction,
                    batch["input"][i] or "",
                    template=self.template,
                    tokenizer=self.tokenizer,
                    system=self.system_prompt,
                )
            else:
                prompt = batch["prompt"][i]
            responses = list(batch["responses"][i])[: self.max_candidates]
            ex = tokenize_candidates(
                prompt,
                responses,
                self.tokenizer,
                max_length=self.max_length,
                separator=response_separator(self.template),
                add_special_tokens=self.template == "alpaca",
            )
            out["id"].append(batch["id"][i])
            out["sample_index"].append(int(batch["sample_index"][i]))
            out["input_ids"].append([np.asarray(ids, dtype=np.int32) for ids in ex.input_ids])
            out["prompt_len"].append(np.asarray(ex.prompt_len, dtype=np.int32))
            out["num_candidates"].append(len(ex.input_ids))
            out["num_truncated"].append(ex.num_truncated)
            out["num_dropped"].append(ex.num_dropped)
        return out


@dataclass
class DatasetStats:
    """Counts for the stage report."""

    records: int
    samples: int  # records x epochs, before exclusion
    excluded_too_few_candidates: int  # rows left with fewer candidates than the mode needs
    truncated_candidates: int
    dropped_candidates: int  # prompt filled the window: no response token left
    max_candidates: int


def global_order(num_records: int, epochs: int, seed: int) -> list[int]:
    """Record index of each global sample: one seeded permutation per epoch, concatenated."""
    order: list[int] = []
    for epoch in range(epochs):
        perm = list(range(num_records))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        order.extend(perm)
    return order


SAMPLES_PER_TOKENIZE_ACTOR = 4096  # ~2 s of work per actor: more actors would cost more to start


def _tokenize_actors(requested: int | None, num_samples: int) -> int:
    """Tokenisation actors: as asked, else one per 4096 samples, at most the cluster's CPUs."""
    if requested is not None:
        return requested
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus, -(-num_samples // SAMPLES_PER_TOKENIZE_ACTOR)))


def build_training_dataset(
    records: list[dict],
    *,
    model_path: str,
    template: str,
    system_prompt: str | None,
    max_length: int,
    epochs: int,
    seed: int,
    min_candidates: int,
    max_candidates: int | None = None,
    num_tokenize_actors: int | None = None,
):
    """Tokenise ``records`` in Ray Data, in parallel; return ``(dataset, DatasetStats)``.

    The dataset holds the usable samples in global sample order (materialised). Order is kept
    by this dataset's own execution options, never by the driver-wide ``DataContext``, which
    the stages that run after training in the same driver share.
    """
    import ray.data

    items = []
    for sample_index, rec_index in enumerate(global_order(len(records), epochs, seed)):
        rec = records[rec_index]
        items.append(
            {
                "id": rec["id"],
                "sample_index": sample_index,
                "instruction": rec.get("instruction") or "",
                "input": rec.get("input") or "",
                "prompt": rec.get("prompt") or "",
                "responses": list(rec["responses"]),
            }
        )
    actors = _tokenize_actors(num_tokenize_actors, len(items))
    source = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), actors * 4)))
    source.context.execution_options.preserve_order = True
    tokenized = source.map_batches(
        TokenizeRanked,
        fn_constructor_kwargs={
            "model_path": model_path,
            "template": template,
            "system_prompt": system_prompt,
            "max_length": max_length,
            "max_candidates": max_candidates,
        },
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
    ).materialize()
    counts = tokenized.select_columns(
        ["num_candidates", "num_truncated", "num_dropped"]
    ).to_pandas()
    kept = tokenized.filter(expr=f"num_candidates >= {min_candidates}").materialize()
    stats = DatasetStats(
        records=len(records),
        samples=len(items),
        excluded_too_few_candidates=int((counts["num_candidates"] < min_candidates).sum()),
        truncated_candidates=int(counts["num_truncated"].sum()),
        dropped_candidates=int(counts["num_dropped"].sum()),
        max_candidates=int(counts["num_candidates"].max()) if len(counts) else 0,
    )
    return kept, stats


def rank_of(position, *, global_batch: int, world: int):
    """The rank that trains the sample at ``position`` (an int or an array of them).

    >>> [rank_of(q, global_batch=4, world=2) for q in range(8)]
    [0, 1, 0, 1, 0, 1, 0, 1]
    """
    return (position % global_batch) % world


def _add_positions(batch, *, position_of, global_batch: int, world: int):
    """``position`` in the global order of usable samples (-1: past the last full step), and
    the rank that trains it. On Arrow tables: the ragged token columns pass through as they
    are (a NumPy batch would turn them into object arrays Arrow cannot take back)."""
    import pyarrow as pa

    position = np.asarray(position_of)[batch.column("sample_index").to_numpy()]
    rank = np.where(position >= 0, rank_of(position, global_batch=global_batch, world=world), -1)
    return batch.append_column("position", pa.array(position)).append_column("rank", pa.array(rank))


def split_by_rank(kept, *, world: int, global_batch: int, total_steps: int) -> dict:
    """``{"rank<r>": dataset}``: each rank's samples of the first ``total_steps`` steps, in order.

    Position q of the kept samples (in global order) belongs to step q // G and rank
    (q % G) % world, so every rank gets exactly micro_batch x grad_accum samples of each step.
    Each rank's dataset is materialised on its own: a worker pulls its share, never the whole
    dataset.
    """
    order = np.sort(kept.select_columns(["sample_index"]).to_pandas()["sample_index"].to_numpy())
    position_of = np.full(int(order.max()) + 1 if len(order) else 0, -1, dtype=np.int64)
    used = order[: total_steps * global_batch]
    position_of[used] = np.arange(len(used))
    kept.context.execution_options.preserve_order = True
    positioned = kept.map_batches(
        _add_positions,
        fn_kwargs={"position_of": position_of, "global_batch": global_batch, "world": world},
        batch_format="pyarrow",
    ).materialize()
    datasets = {}
    for r in range(world):
        part = positioned.filter(expr=f"rank == {r}")
        part.context.execution_options.preserve_order = True
        datasets[f"rank{r}"] = part.materialize()
    return datasets

"""Ray Data shell of the training data path: records -> tokenised, ordered, materialised dataset.

Input records are ranked records (tuna_ray.data.records): ``id``, ``instruction``/``input`` or a
rendered ``prompt``, ``responses`` best-first. Output columns, one row per (epoch, instruction):

    id: str, sample_index: int64 (position in the run's global sample order),
    input_ids: list[list[int32]] (valid candidates, best-first), prompt_len: list[int32],
    num_candidates: int32, num_truncated: int32, num_dropped: int32

The global order (a seeded permutation per epoch) is fixed here, on the driver, so which samples
make up step k never depends on how many workers read them or when they restart: a resumed run
skips exactly the samples consumed before its checkpoint.
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
    num_tokenize_actors: int = 1,
):
    """Tokenise ``records`` in Ray Data; return ``(materialised dataset, DatasetStats)``."""
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
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    tokenized = (
        ray.data.from_items(items)
        .map_batches(
            TokenizeRanked,
            fn_constructor_kwargs={
                "model_path": model_path,
                "template": template,
                "system_prompt": system_prompt,
                "max_length": max_length,
                "max_candidates": max_candidates,
            },
            batch_size=64,
            compute=ray.data.ActorPoolStrategy(size=num_tokenize_actors),
        )
        .materialize()
    )
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

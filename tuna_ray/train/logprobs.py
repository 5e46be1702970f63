"""Per-candidate log-probabilities of the response tokens: the student side of the Tuna loss.

``candidate_logprobs`` runs all candidates of a micro-batch through the model in one forward
and returns, on the [B, N] grid, the sum of log p(token | prefix) over each candidate's response
tokens and their count. It applies the output head only at the positions that predict response
tokens, so the [tokens, vocab] logits are never built for prompt or padding positions (the
reference formulation, ``reference_candidate_logprobs``, builds full-vocabulary log-softmax over
every position; bench/train_step.py compares both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuna_ray.train.collate import RankingBatch

# Models whose head does more than a linear layer (soft-capping, scaling) go the full-logits way.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _has_plain_head(model) -> bool:
    cfg = model.config
    return all(getattr(cfg, name, None) in (None, 1.0) for name in _HEAD_EXTRAS)


def candidate_logprobs(model, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(logprob_sum [B, N], num_tokens [B, N])`` for the candidates in ``batch``."""
    targets = batch.input_ids[:, 1:]
    predict_mask = batch.target_mask[:, 1:]  # position t-1 predicts token t
    if _has_plain_head(model):
        hidden = model.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        selected = hidden[:, :-1][predict_mask]  # [R, H]: only positions that predict responses
        logits = model.get_output_embeddings()(selected).float()  # [R, V]
    else:
        logits = (
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            .logits[:, :-1][predict_mask]
            .float()
        )
    token_logprob = -F.cross_entropy(logits, targets[predict_mask], reduction="none")  # [R]
    seq_index = torch.arange(batch.num_sequences, device=token_logprob.device)
    seq_of_token = seq_index[:, None].expand_as(predict_mask)[predict_mask]
    per_seq = torch.zeros(
        batch.num_sequences, dtype=token_logprob.dtype, device=token_logprob.device
    )
    per_seq = per_seq.index_add(0, seq_of_token, token_logprob)
    return _to_grid(per_seq, batch), batch.num_tokens.to(per_seq.device)


def reference_candidate_logprobs(model, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's formulation: full logits, full-vocabulary log-softmax, gather, mask."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logprob = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    per_seq = (token_logprob * batch.target_mask[:, 1:]).sum(dim=1)
    return _to_grid(per_seq, batch), batch.num_tokens.to(per_seq.device)


def _to_grid(per_seq: torch.Tensor, batch: RankingBatch) -> torch.Tensor:
    grid = torch.zeros(batch.mask.shape, dtype=per_seq.dtype, device=per_seq.device)
    return grid.index_put((batch.cand_row.to(grid.device), batch.cand_col.to(grid.device)), per_seq)


class CandidateScorer(torch.nn.Module):
    """The module handed to ``deepspeed.initialize``: decoder + response-only output head +
    per-candidate log-prob reduction, called as ``engine(batch)``.

    DeepSpeed's bookkeeping lives in ``DeepSpeedEngine.forward`` and in hooks on the top-level
    module: under ZeRO-3 the micro-step counter that makes gradient accumulation add up (instead
    of each micro-batch overwriting the last) and the parameter-prefetch trace reset. Calling
    the causal LM's submodules directly bypasses both; wrapping the whole computation in one
    module and calling the engine keeps them. ``lm`` is the Hugging Face model (exported as is).

    ``forward(batch) -> (logprob_sum [B, N], num_tokens [B, N])`` for a packed batch
    (tuna_ray.train.packing, the default) or a padded one (``candidate_logprobs``).
    """

    def __init__(self, lm: torch.nn.Module, *, head_chunk_logits: int | None = None):
        super().__init__()
        self.lm = lm
        self.plain_head = _has_plain_head(lm)
        self.head_chunk_logits = head_chunk_logits
        head = lm.get_output_embeddings()
        if self.plain_head and hasattr(head.weight, "ds_id"):
            # ZeRO-3: the packed path reads the head's weight in this module's forward (one
            # gather per forward, however many chunks): tell DeepSpeed to gather it here.
            import deepspeed

            deepspeed.zero.register_external_parameter(self, head.weight)
            if head.bias is not None:
                deepspeed.zero.register_external_parameter(self, head.bias)

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        from tuna_ray.train.packing import PackedBatch, packed_candidate_logprobs

        if isinstance(batch, PackedBatch):
            return packed_candidate_logprobs(
                self.lm, batch, plain_head=self.plain_head, chunk_logits=self.head_chunk_logits
            )
        return candidate_logprobs(self.lm, batch)

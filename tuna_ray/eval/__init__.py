"""Evaluation: how good is a (Tuna-trained) model, and does it rank answers the way Tuna trains?

Stage: eval. Tasks (one pure scorer each, plus the Ray Data shell in ``stages.py``):

- ``pairwise_judge`` (``pairwise.py``): win rate against reference answers (Vicuna QA, AlpacaEval)
  by an OpenAI-compatible judge, both orders asked, ties half, bootstrap interval, answer
  lengths and a length-controlled win rate beside it;
- ``rouge_l`` (``superni.py``): Super-NaturalInstructions zero-shot ROUGE-L and exact match with
  the official normalisation;
- ``ranking_agreement`` (``agreement.py``): the share of ordered answer pairs of a ranked set
  whose mean token log-prob follows the given order, beside a length-only baseline.

Public API (what ``tuna-ray eval`` and the pipeline call)::

    from tuna_ray.eval import EvalConfig, run_eval, render_comparison
    results = run_eval(EvalConfig.model_validate(...), endpoints=None)  # writes results.json
    markdown = render_comparison(["a/results.json", "b/results.json"])
"""

from tuna_ray.eval.config import EvalConfig, EvalModelConfig
from tuna_ray.eval.digests import model_fingerprint
from tuna_ray.eval.run import embedded_servers, evaluate_model, run_eval
from tuna_ray.eval.table import load_results, render_comparison

__all__ = [
    "EvalConfig",
    "EvalModelConfig",
    "embedded_servers",
    "evaluate_model",
    "load_results",
    "model_fingerprint",
    "render_comparison",
    "run_eval",
]

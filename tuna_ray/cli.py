"""``tuna-ray`` command line: one entry point, one subcommand per stage.

tuna-ray train --config jobs/configs/train-demo-cpu.yaml [dotted.key=value ...]
tuna-ray rank-probabilistic --config jobs/configs/<name>.yaml [key=value ...]
tuna-ray eval --config jobs/configs/eval-<name>.yaml [key=value ...]
tuna-ray serve --model builtin:smollm2-135m-instruct [--port 0]
tuna-ray prepare-model smollm2-135m-instruct      # convert/cache a builtin model
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable


def _train(cfg) -> dict:
    from tuna_ray.train.trainer import run_training

    outcome = run_training(cfg)
    return {
        "run_dir": outcome.run_dir,
        "model_dir": outcome.model_dir,
        "final_metrics": outcome.report["final_metrics"],
    }


def _rank_probabilistic(cfg) -> dict:
    from tuna_ray.ranking.probabilistic_stage import run_probabilistic

    return run_probabilistic(cfg)


def _sample(cfg) -> dict:
    from tuna_ray.ranking.sampling_stage import run_sampling

    return run_sampling(cfg)


def _rank_contextual(cfg) -> dict:
    from tuna_ray.ranking.contextual_stage import run_contextual

    return run_contextual(cfg)


def _run(cfg) -> dict:
    from tuna_ray.pipeline import run_pipeline

    return run_pipeline(cfg)


def _eval(cfg) -> dict:
    from tuna_ray.eval import run_eval

    return run_eval(cfg)


def _stages() -> dict[str, tuple[str, str, Callable]]:
    """command -> (help, config class name in tuna_ray.config, or "module:Class", runner)."""
    return {
        "run": ("the whole Tuna pipeline, stage after stage (resumable)", "PipelineConfig", _run),
        "train": (
            "finetune with the Tuna loss (or SFT) on Ray Train + DeepSpeed",
            "TrainJobConfig",
            _train,
        ),
        "sample": (
            "the student samples N diverse answers per instruction",
            "SamplingStageConfig",
            _sample,
        ),
        "rank-probabilistic": (
            "teacher samples N answers, ranked by mean token log-prob",
            "ProbabilisticStageConfig",
            _rank_probabilistic,
        ),
        "rank-contextual": (
            "a judge LLM ranks each instruction's candidates in one prompt",
            "ContextualStageConfig",
            _rank_contextual,
        ),
        "eval": (
            "evaluate models: pairwise judge, Super-NI ROUGE-L, ranking agreement",
            "tuna_ray.eval.config:EvalConfig",
            _eval,
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuna-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _, _) in _stages().items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help="YAML config file")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides, e.g. train.optim.learning_rate=2e-5",
        )
    from tuna_ray.serve import server

    server.add_arguments(sub.add_parser("serve", help="local OpenAI-compatible server"))
    prep = sub.add_parser("prepare-model", help="build a builtin model folder and print its path")
    prep.add_argument("name", help="builtin model name, e.g. smollm2-135m-instruct")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        from tuna_ray.serve import server

        return server.main(args)
    if args.command == "prepare-model":
        from tuna_ray.models import resolve_model

        print(resolve_model("builtin:" + args.name))
        return 0

    from pydantic import ValidationError

    import tuna_ray.config as config_module
    import tuna_ray.pipeline as pipeline_module
    from tuna_ray.data.records import RecordError
    from tuna_ray.lease import LeaseHeldError, LeaseLostError
    from tuna_ray.ranking.runner import TooManyFailuresError
    from tuna_ray.storage import StorageError

    _, config_name, run = _stages()[args.command]
    try:
        if ":" in config_name:  # "package.module:Class": a config that lives with its stage
            module_name, _, class_name = config_name.partition(":")
            model = getattr(importlib.import_module(module_name), class_name)
        else:
            model = getattr(config_module, config_name, None) or getattr(
                pipeline_module, config_name
            )
        cfg = config_module.load_config(args.config, args.overrides, model)
        print(json.dumps(run(cfg), indent=2, default=str))
        return 0
    except TooManyFailuresError as exc:
        # Results and manifest are written; the same command again retries only the failures.
        if args.verbose:
            raise
        print(f"tuna-ray {args.command}: error: {exc}", file=sys.stderr)
        return 3
    except (
        ValidationError,
        RecordError,
        FileNotFoundError,
        ValueError,
        StorageError,
        LeaseHeldError,
        LeaseLostError,
        pipeline_module.StageFailedError,
    ) as exc:
        # Bad config, bad data, unwritable storage, another run holding the output: a clear
        # message, not a traceback from deep inside Ray.
        if args.verbose:
            raise
        print(f"tuna-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

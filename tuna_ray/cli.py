"""``tuna-ray`` command line: one entry point, one subcommand per stage.

  tuna-ray run --config jobs/configs/demo-cpu.yaml                 # the whole Tuna pipeline
  tuna-ray run --config jobs/configs/demo-cpu.yaml --print-config  # what it would run
  tuna-ray train --config jobs/configs/train-demo-cpu.yaml train.epochs=2
  tuna-ray eval --config jobs/configs/eval-ranking-agreement-cpu.yaml
  tuna-ray serve --model builtin:smollm2-135m-instruct --port 0
  tuna-ray prepare-model smollm2-135m-instruct      # convert/cache a builtin model

Every stage command takes a YAML config and dotted ``key=value`` overrides; ``--print-config``
prints the fully resolved config and exits (no Ray, nothing written); ``tuna-ray CMD --help``
lists the command's config sections.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


@dataclass(frozen=True)
class Command:
    help: str
    config: str  # "module:Class" of its config model
    run: Callable[[object], dict]
    examples: tuple[str, ...]  # each runs as shown (tests/test_cli.py runs them)
    resumes: str  # what Ctrl-C keeps and how to go on


def commands() -> dict[str, Command]:
    train_c = "tuna-ray train --config jobs/configs/train-demo-cpu.yaml"
    resumes_stage = "every finished batch is kept in output_dir; rerun the same command to resume"
    return {
        "run": Command(
            "the whole Tuna pipeline, stage after stage (resumable)",
            "tuna_ray.pipeline:PipelineConfig",
            _run,
            (
                "tuna-ray run --config jobs/configs/demo-cpu.yaml",
                (
                    "tuna-ray run --config jobs/configs/demo-cpu.yaml"
                    " train_p.optim.learning_rate=2e-5 --print-config"
                ),
            ),
            "finished stages and the stage in flight's written parts are kept in run_dir; "
            "rerun the same command to resume",
        ),
        "train": Command(
            "finetune with the Tuna loss (or SFT) on Ray Train + DeepSpeed",
            "tuna_ray.config:TrainJobConfig",
            _train,
            (train_c, f"{train_c} train.optim.learning_rate=2e-5 train.epochs=2 --print-config"),
            "checkpoints are kept in the run dir; rerun the same command to resume from the last",
        ),
        "sample": Command(
            "the student samples N diverse answers per instruction",
            "tuna_ray.config:SamplingStageConfig",
            _sample,
            ("tuna-ray sample --config jobs/configs/sample-smollm2-cpu.yaml --print-config",),
            resumes_stage,
        ),
        "rank-probabilistic": Command(
            "teacher samples N answers, ranked by mean token log-prob",
            "tuna_ray.config:ProbabilisticStageConfig",
            _rank_probabilistic,
            (
                (
                    "tuna-ray rank-probabilistic --config jobs/configs/rank-probabilistic-tiny.yaml"
                    " sampling.max_tokens=32 --print-config"
                ),
            ),
            resumes_stage,
        ),
        "rank-contextual": Command(
            "a judge LLM ranks each instruction's candidates in one prompt",
            "tuna_ray.config:ContextualStageConfig",
            _rank_contextual,
            (
                (
                    "tuna-ray rank-contextual --config jobs/configs/rank-contextual-tiny.yaml"
                    " folds=3 shuffle=true --print-config"
                ),
            ),
            resumes_stage,
        ),
        "eval": Command(
            "evaluate models: pairwise judge, Super-NI ROUGE-L, ranking agreement",
            "tuna_ray.eval.config:EvalConfig",
            _eval,
            ("tuna-ray eval --config jobs/configs/eval-ranking-agreement-cpu.yaml --print-config",),
            "finished tasks are cached in output_dir; rerun the same command to resume",
        ),
    }


def config_model(command: Command):
    module, _, name = command.config.partition(":")
    return getattr(importlib.import_module(module), name)


def _type_name(annotation) -> str:
    """``Literal['a', 'b']`` -> ``a|b``; ``tuna_ray.config.TrainConfig | None`` -> the same
    without module paths."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in args)
    text = getattr(annotation, "__name__", None) or str(annotation)
    return re.sub(r"\b(?:[a-z_]\w*\.)+(?=\w)", "", text)


def _sections(model) -> str:
    """The config's top-level fields: name, type, default (or "required")."""
    lines = []
    for name, field in model.model_fields.items():
        if field.is_required():
            default = "required"
        elif isinstance(field.default, str | int | float | bool) or field.default is None:
            default = f"default {field.default!r}"
        else:
            default = "a section"
        lines.append(f"  {name}: {_type_name(field.annotation)} ({default})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuna-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in commands().items():
        model = config_model(command)
        epilog = (
            "examples:\n"
            + "".join(f"  {e}\n" for e in command.examples)
            + f"\nconfig sections ({command.config.replace(':', '.')}; every field, its default "
            "and meaning, is in that class; unknown keys are errors):\n"
            + _sections(model)
            + "\n\n--print-config shows every value the run would use, defaults included."
        )
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", required=True, help="YAML config file")
        p.add_argument(
            "--print-config",
            action="store_true",
            help="print the fully resolved config as YAML and exit (no Ray, nothing written)",
        )
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides of the config (see the examples below)",
        )
    from tuna_ray.serve import server

    server.add_arguments(sub.add_parser("serve", help="local OpenAI-compatible server"))
    prep = sub.add_parser("prepare-model", help="build a builtin model folder and print its path")
    prep.add_argument("name", help="builtin model name, e.g. smollm2-135m-instruct")
    return parser


def resolved_config(command: str, cfg) -> dict:
    """What ``--print-config`` prints: the config with every default; for ``run``, also each
    stage's own config as the pipeline will run it."""
    dumped = cfg.model_dump(mode="json")
    if command != "run":
        return dumped
    from tuna_ray.pipeline import plan

    stages = {s.name: s.config.model_dump(mode="json") for s in plan(cfg)}
    return {"pipeline": dumped, "stages": stages}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
    )
    if args.command == "serve":
        from tuna_ray.serve import server

        return server.main(args)
    if args.command == "prepare-model":
        from tuna_ray.models import resolve_model

        print(resolve_model("builtin:" + args.name))
        return 0

    from pydantic import ValidationError

    from tuna_ray.config import load_config
    from tuna_ray.data.records import RecordError
    from tuna_ray.lease import LeaseHeldError, LeaseLostError
    from tuna_ray.pipeline import StageFailedError
    from tuna_ray.ranking.runner import TooManyFailuresError
    from tuna_ray.storage import StorageError

    command = commands()[args.command]
    try:
        cfg = load_config(args.config, args.overrides, config_model(command))
        if args.print_config:
            import yaml

            print(yaml.safe_dump(resolved_config(args.command, cfg), sort_keys=False), end="")
            return 0
        print(json.dumps(command.run(cfg), indent=2, default=str))
        return 0
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(f"\ntuna-ray {args.command}: interrupted: {command.resumes}.", file=sys.stderr)
        return 130
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
        StageFailedError,
    ) as exc:
        # Bad config, bad data, unwritable storage, another run holding the output: a clear
        # message, not a traceback from deep inside Ray.
        if args.verbose:
            raise
        print(f"tuna-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

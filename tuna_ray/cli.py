"""``tuna-ray`` command line: one entry point, one subcommand per stage.

tuna-ray train --config jobs/configs/train-demo-cpu.yaml [dotted.key=value ...]
tuna-ray prepare-model smollm2-135m-instruct      # convert/cache a builtin model
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _stage_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.learning_rate=2e-5",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuna-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _stage_parser(sub, "train", "finetune with the Tuna loss (or SFT) on Ray Train + DeepSpeed")
    from tuna_ray.serve import server

    server.add_arguments(sub.add_parser("serve", help="local OpenAI-compatible server (tests, demo)"))
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

    from tuna_ray.config import TrainJobConfig, load_config
    from tuna_ray.data.records import RecordError

    try:
        if args.command == "train":
            from tuna_ray.train.trainer import run_training

            outcome = run_training(load_config(args.config, args.overrides, TrainJobConfig))
            print(
                json.dumps(
                    {
                        "run_dir": outcome.run_dir,
                        "model_dir": outcome.model_dir,
                        "final_metrics": outcome.report["final_metrics"],
                    },
                    indent=2,
                )
            )
            return 0
    except (ValidationError, RecordError, FileNotFoundError, ValueError) as exc:
        # Bad config or bad data: a clear message, not a traceback from deep inside Ray.
        print(f"tuna-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())

"""The command line a newcomer meets first: help whose examples run, --print-config, errors."""

from __future__ import annotations

import shlex

import pytest
import yaml

from tuna_ray import cli

EXAMPLES = [(name, e) for name, c in cli.commands().items() for e in c.examples]


def _main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("command", "example"), EXAMPLES, ids=[e for _, e in EXAMPLES])
def test_every_help_example_runs(capsys, command, example):
    """Each example of ``tuna-ray CMD --help`` parses and validates as shown. Examples that
    would start a run are checked with --print-config (the runs are the pipeline's tests)."""
    argv = shlex.split(example)
    assert argv[:2] == ["tuna-ray", command]
    if "--print-config" not in argv:
        argv.append("--print-config")
    code, out, err = _main(capsys, argv[1:])
    assert code == 0, err
    assert isinstance(yaml.safe_load(out), dict)


def test_help_shows_the_examples_and_the_config_sections(capsys):
    for name, command in cli.commands().items():
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        text = capsys.readouterr().out
        assert all(e in text for e in command.examples), name
        for field in cli.config_model(command).model_fields:
            assert f"  {field}: " in text, (name, field)
        assert "--print-config" in text


def test_print_config_resolves_everything_and_touches_nothing(tmp_path, capsys):
    import ray

    ray_before = ray.is_initialized()
    import ray

    run_dir = tmp_path / "run"
    code, out, err = _main(
        capsys,
        [
            "run",
            "--config",
            "jobs/configs/demo-cpu.yaml",
            f"run_dir={run_dir}",
            "train_c.epochs=1",
            "--print-config",
        ],
    )
    assert code == 0, err
    printed = yaml.safe_load(out)
    # defaults of a partial section survive (the contextual phase's paper learning rate)
    assert printed["pipeline"]["train_c"]["epochs"] == 1
    assert printed["pipeline"]["train_c"]["optim"]["learning_rate"] == 1e-6
    # each stage as the pipeline will run it
    assert printed["stages"]["train_c"]["train"]["optim"]["learning_rate"] == 1e-6
    assert set(printed["stages"]) >= {"rank_probabilistic", "train_p", "train_c"}
    # nothing written, and no Ray started by it (the suite may have one running already)
    assert not run_dir.exists() and ray.is_initialized() == ray_before


def test_an_override_without_equals_says_what_was_expected(capsys):
    code, _, err = _main(
        capsys, ["train", "--config", "jobs/configs/train-demo-cpu.yaml", "train.epochs"]
    )
    assert code == 2
    assert err.count("\n") == 1 and "expected key=value" in err

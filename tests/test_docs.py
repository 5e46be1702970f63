"""The docs say what the code does: every command, config key, config file and version pin that
README.md and cluster/README.md show is checked against the code and the shipped configs.

No Ray, no models: commands are parsed by the CLI's own argparse parser and validated the way
``--print-config`` does it (``load_config`` + ``resolved_config``; for ``run`` every stage is
planned too), in this process.

What is extracted (the rules are deliberately simple; a doc edit can tell what is checked):

- **Snippets**: every logical line of a fenced code block (backslash continuations joined) and
  every inline code span (a span across a line break reads as one line, as Markdown renders it).
- **Commands**: in a snippet, ``tuna-ray SUB [ARGS]`` or ``python jobs/X.py [ARGS]`` where it
  starts the snippet or follows ``--`` (``ray job submit ... -- python jobs/...``), ``&&``,
  ``||``, ``;`` or ``|`` (``tuna-ray`` alone is the project's name, not a command).
  ``jobs/X.py`` must exist and maps to the subcommand its ``main([...])`` names. The arguments
  go through the CLI's parser; a given ``--config`` must exist and, with the ``key=value``
  overrides, validate. ``tuna-ray SUB`` alone names the command (only SUB is checked);
  ``--config ...`` is an elision (the arguments are parsed, the config is not loaded).
- **Keys**: an inline span that is exactly ``KEY=VALUE`` or ``DOTTED.KEY: VALUE``, or exactly a
  bare ``DOTTED.KEY`` whose first part is the name of a field of some config (so
  ``tuna_ray.models.resolve_model``, ``ray.data.llm``, ``report.md`` or ``provider.region`` are
  not keys, while ``run.storage_path`` is). KEY parts are lowercase identifiers, list indices or
  ``<placeholder>`` (a dict key). The key must name a field of the pipeline config (from its
  root, or from any section in it: ``engine.base_url``, ``scaling.cpus_per_actor``), or of the
  config of a command named on the same line (``tuna-ray train`` (``train.mode=sft``)). The
  pipeline's stage sections are the stage configs without the fields the pipeline fills in.
- **Files**: every path under ``jobs/`` (configs, entry points), ``cluster/`` or ``tuna_ray/``
  mentioned anywhere exists; an inline span that is just a YAML file name (``demo-cpu.yaml``)
  exists under ``jobs/configs/`` or ``cluster/``.
- **Pins**: every ``package==version`` in the docs equals pyproject.toml's pin of that package.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import BaseModel

from tuna_ray import cli
from tuna_ray.config import (
    ContextualStageConfig,
    ProbabilisticStageConfig,
    SamplingStageConfig,
    load_config,
)
from tuna_ray.pipeline import PipelineConfig, plan

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "cluster/README.md")

# PipelineConfig's stage sections (dicts) and the stage config each is validated into
# (tuna_ray/pipeline/stages.py), minus the fields the pipeline fills in itself. Both are checked
# against plan() below.
STAGE_SECTIONS = {
    "probabilistic": ("rank_probabilistic", ProbabilisticStageConfig),
    "sampling": ("sample", SamplingStageConfig),
    "contextual": ("rank_contextual", ContextualStageConfig),
}
PIPELINE_FILLS = frozenset({"input", "output_dir"})


# ----------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Snippet:
    line: int  # 1-based line of the doc where it starts
    text: str
    inline: bool


def snippets(markdown: str) -> list[Snippet]:
    """Fenced blocks' logical lines and inline code spans, with their line numbers."""
    out: list[Snippet] = []
    prose: list[str] = []  # the doc with fenced lines blanked (line numbers kept)
    in_fence, pending, start = False, "", 0
    for number, line in enumerate(markdown.split("\n"), start=1):
        if re.match(r"\s*(```|~~~)", line):
            in_fence, pending = not in_fence, ""
            prose.append("")
            continue
        if not in_fence:
            prose.append(line)
            continue
        prose.append("")
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(Snippet(start, pending + line, inline=False))
        pending = ""
    text = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", text):
        if "\n\n" in m.group(1):
            continue  # not a span: backticks in different paragraphs
        span = re.sub(r"\s*\n\s*", " ", m.group(1)).strip()
        out.append(Snippet(text.count("\n", 0, m.start()) + 1, span, inline=True))
    return sorted(out, key=lambda s: s.line)


_COMMAND = re.compile(
    r"(?:^|(?<=\s)--|&&|\|\||;|\|)\s*"  # where a command starts
    r"(?:tuna-ray(?=\s+\S)|python\s+(jobs/[\w/.-]+\.py)(?=\s|$))"
    r"(.*)"  # its arguments (and what follows them)
)


@dataclass(frozen=True)
class Command:
    line: int
    text: str
    script: str | None  # jobs/X.py, or None for tuna-ray
    args: tuple[str, ...]  # after the script / after ``tuna-ray``


def commands(markdown: str) -> list[Command]:
    found = []
    for snippet in snippets(markdown):
        for m in _COMMAND.finditer(snippet.text):
            found.append(Command(snippet.line, m.group(0).strip(), m.group(1), _args(m.group(2))))
    return found


def _args(rest: str) -> tuple[str, ...]:
    """Shell words up to the end of the command (a comment, ``&&``, ``;``, ``|``)."""
    lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = []
    for word in lexer:
        if word and set(word) <= set("&|;()<>"):
            break
        words.append(word)
    return tuple(words)


_PART = r"(?:[a-z_][a-z0-9_]*|\d+|<[\w-]+>)"
_KEY = rf"[a-z_][a-z0-9_]*(?:\.{_PART})*"
_DOTTED = rf"[a-z_][a-z0-9_]*(?:\.{_PART})+"
_KEY_MENTION = re.compile(rf"({_KEY})=(?!=).*|({_DOTTED}): .+|({_DOTTED})")


@dataclass(frozen=True)
class Key:
    line: int
    text: str  # the whole span
    key: str
    bare: bool  # no value given: a key only if its first part names a config field


def keys(markdown: str) -> list[Key]:
    found = []
    for snippet in snippets(markdown):
        m = _KEY_MENTION.fullmatch(snippet.text) if snippet.inline else None
        if m:
            key = m.group(1) or m.group(2) or m.group(3)
            found.append(Key(snippet.line, snippet.text, key, bare=bool(m.group(3))))
    return found


def repo_paths(markdown: str) -> list[tuple[int, str]]:
    """Paths under jobs/, cluster/ or tuna_ray/ mentioned anywhere (prose, spans, code); a path
    ends before a character that cannot be in one (``cluster/kuberay/*.yaml``: the folder)."""
    return [
        (markdown.count("\n", 0, m.start()) + 1, m.group(0))
        for m in re.finditer(r"(?<![\w/.~-])(?:jobs|cluster|tuna_ray)/(?:[\w./-]*[\w/])?", markdown)
    ]


def yaml_names(markdown: str) -> list[tuple[int, str]]:
    """Inline spans that are just a YAML file name (``demo-cpu.yaml``, ``kuberay/rayjob.yaml``)."""
    return [
        (s.line, s.text)
        for s in snippets(markdown)
        if s.inline and re.fullmatch(r"[\w.-]+(?:/[\w.-]+)*\.ya?ml", s.text)
    ]


def pins(markdown: str) -> list[tuple[int, str, str]]:
    """``package==version`` (extras dropped) mentioned anywhere."""
    return [
        (markdown.count("\n", 0, m.start()) + 1, m.group(1).lower(), m.group(2))
        for m in re.finditer(r"(?<![\w.-])([A-Za-z][\w.-]*)(?:\[[\w,-]+\])?==([\w.]*\w)", markdown)
    ]


# ----------------------------------------------------------------------------- the code's side


@functools.cache
def _parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _script_subcommand(script: str) -> str:
    """The subcommand a jobs/ entry point runs: its ``main(["SUB", *sys.argv[1:]])``."""
    m = re.search(r"""main\(\[\s*["']([\w-]+)["']""", (ROOT / script).read_text())
    assert m, f"{script}: no main([...]) call naming a subcommand"
    return m.group(1)


@dataclass(frozen=True)
class Section:
    """A config model as a section of another, less the fields its parent fills in."""

    model: type[BaseModel]
    hidden: frozenset[str] = frozenset()


def _fields(node) -> dict[str, object]:
    model, hidden = (node.model, node.hidden) if isinstance(node, Section) else (node, frozenset())
    fields = {n: f.annotation for n, f in model.model_fields.items() if n not in hidden}
    if model is PipelineConfig:
        for name, (_, stage) in STAGE_SECTIONS.items():
            fields[name] = Section(stage, PIPELINE_FILLS)
    return fields


def _hidden(node) -> frozenset[str]:
    return node.hidden if isinstance(node, Section) else frozenset()


def _name(node) -> str:
    return node.model.__name__ if isinstance(node, Section) else node.__name__


def _is_section(tp) -> bool:
    return isinstance(tp, Section) or (isinstance(tp, type) and issubclass(tp, BaseModel))


def _members(tp) -> list:
    """The types a field's annotation may take (Optional and unions unwrapped)."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) if a is not type(None) for m in _members(a)]
    return [tp]


def resolve(tp, parts: list[str]) -> str | None:
    """None if ``parts`` is a path into ``tp``, else why not."""
    if not parts:
        return None
    whys = []
    for member in _members(tp):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if member is typing.Any:
            return None
        if _is_section(member):
            fields = _fields(member)
            if parts[0] in fields:
                why = resolve(fields[parts[0]], parts[1:])
            elif parts[0] in _hidden(member):
                why = f"{parts[0]!r} is filled in by the pipeline, not taken from the config"
            else:
                why = f"{_name(member)} has no field {parts[0]!r}"
        elif origin is dict:
            why = resolve(args[1], parts[1:])
        elif origin in (list, tuple) and parts[0].isdigit():
            why = resolve(args[0], parts[1:])
        else:
            why = f"{parts[0]!r}: {member} has no sub-keys"
        if why is None:
            return None
        whys.append(why)
    return whys[0]


def _sections(root) -> list:
    """Every config section reachable from ``root`` (itself included)."""
    seen, todo = [], [root]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.append(node)
        for tp in _fields(node).values():
            for member in _members(tp):
                while typing.get_origin(member) in (dict, list, tuple):
                    member = typing.get_args(member)[-1 if typing.get_origin(member) is dict else 0]
                if _is_section(member):
                    todo.append(member)
    return seen


@functools.cache
def _roots() -> dict[str, type[BaseModel]]:
    return {name: cli.config_model(c) for name, c in cli.commands().items()}


def _field_names() -> set[str]:
    return {f for root in _roots().values() for s in _sections(root) for f in _fields(s)}


def check_key(key: str, roots: list[type[BaseModel]]) -> str | None:
    """None if ``key`` names a field from one of ``roots`` or from a section inside one."""
    parts = key.split(".")
    whys = []
    for root in roots:
        section_whys = [resolve(section, parts) for section in _sections(root)]
        if None in section_whys:
            return None
        filled = [w for w in section_whys if "filled in by the pipeline" in w]
        whys.append(
            f"{resolve(root, parts)} (nor any section in it{': ' + filled[0] if filled else ''})"
        )
    return "; ".join(whys)


def check_command(cmd: Command) -> str | None:
    """None if the command runs as shown (as far as validating it goes), else why not."""
    if cmd.script is not None:
        if not (ROOT / cmd.script).is_file():
            return f"{cmd.script} does not exist"
        argv = [_script_subcommand(cmd.script), *cmd.args]
    else:
        argv = list(cmd.args)
    if not argv:
        return "no subcommand"
    if argv[0] not in _subcommands():
        return f"tuna-ray has no subcommand {argv[0]!r} (it has {sorted(_subcommands())})"
    if len(argv) == 1:
        return None  # the command named, not run
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = _parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:
            return None  # --help
        return f"the CLI rejects the arguments: {stderr.getvalue().strip()}"
    if getattr(args, "config", None) in (None, "..."):
        return None
    if not (ROOT / args.config).is_file():
        return f"config {args.config} does not exist"
    try:
        model = cli.config_model(cli.commands()[args.command])
        cfg = load_config(ROOT / args.config, args.overrides, model)
        cli.resolved_config(args.command, cfg)  # what --print-config prints: plans every stage
    except Exception as exc:  # noqa: BLE001 -- any reason it would not run is the finding
        return f"does not validate: {type(exc).__name__}: {exc}"
    return None


def _line_commands(line: str) -> list[str]:
    """The config commands a doc line names (``tuna-ray train``, ``jobs/train.py``)."""
    named = re.findall(r"tuna-ray ([\w-]+)", line)
    named += [_script_subcommand(p) for p in re.findall(r"jobs/\w+\.py", line)]
    return [n for n in named if n in _roots()]


def problems(markdown: str, doc: str = "<doc>") -> list[str]:
    """Every command, key, config path and pin of ``markdown`` that the code contradicts."""
    lines = markdown.split("\n")
    out = []
    for cmd in commands(markdown):
        why = check_command(cmd)
        if why:
            out.append(f"{doc}:{cmd.line}: `{cmd.text}`: {why}")
    field_names = _field_names()
    for k in keys(markdown):
        if k.bare and k.key.split(".")[0] not in field_names:
            continue  # a dotted name that is no config's (a module, a file, a cloud setting)
        roots = [PipelineConfig] + [_roots()[c] for c in _line_commands(lines[k.line - 1])]
        why = check_key(k.key, roots)
        if why:
            out.append(f"{doc}:{k.line}: `{k.text}`: {k.key} is not a config key: {why}")
    for line, path in repo_paths(markdown):
        if not (ROOT / path).exists():
            out.append(f"{doc}:{line}: {path} does not exist")
    for line, name in yaml_names(markdown):
        if not any((ROOT / d).rglob(name) for d in ("jobs/configs", "cluster")):
            out.append(f"{doc}:{line}: `{name}`: no such file under jobs/configs/ or cluster/")
    pinned = _pyproject_pins()
    for line, package, version in pins(markdown):
        if package in pinned and pinned[package] != version:
            out.append(
                f"{doc}:{line}: {package}=={version}, but pyproject.toml pins "
                f"{package}=={pinned[package]}"
            )
    return out


@functools.cache
def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    out = {}
    for req in requirements:
        m = re.match(r"\s*([A-Za-z][\w.-]*)(?:\[[\w,-]+\])?==([\w.]*\w)", req.split(";")[0])
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths in configs resolve as they do for the docs' reader


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_key_config_and_pin_in_the_doc_is_real(doc):
    found = problems((ROOT / doc).read_text(), doc)
    assert not found, "the doc says what the code does not:\n" + "\n".join(found)


@pytest.mark.parametrize("doc", DOCS)
def test_the_doc_shows_commands_and_keys_at_all(doc):
    text = (ROOT / doc).read_text()
    assert any(c.args and "--config" in c.args for c in commands(text))
    assert keys(text)


BAD_DOC = """\
# A doc

```bash
ray job submit --address http://HEAD:8265 --working-dir . \\
    --runtime-env cluster/runtime_env.yaml \\
    -- python jobs/tuna.py --config jobs/configs/tiny-cpu.yaml run_dir=s3://bucket/run1
tuna-ray run --config jobs/configs/tiny-cpu.yaml train_p.no_such_key=1   # a comment
cd /path/to/tuna-ray && python jobs/nope.py --config jobs/configs/tiny-cpu.yaml
```

Set `train_p.optim.learning_rate=2e-5` and `contextual.engine.base_url: http://judge/v1`, not
`run.storage_path`; see `tuna_ray.models.resolve_model`, `report.md`, `hf_model/` and
`servers.<name>`. `tuna-ray train` takes `train.mode=sft`;
elsewhere `train.mode=sft` is wrong.
Shipped: `tiny-cpu.yaml`, `jobs/configs/missing.yaml`; pins: `vllm==0.0.1`.
"""


def test_the_extractor_reports_exactly_the_bad_mentions():
    cmds = commands(BAD_DOC)
    assert [(c.line, c.script, c.args[:2]) for c in cmds] == [
        (4, "jobs/tuna.py", ("--config", "jobs/configs/tiny-cpu.yaml")),
        (7, None, ("run", "--config")),
        (8, "jobs/nope.py", ("--config", "jobs/configs/tiny-cpu.yaml")),
        (13, None, ("train",)),
    ]
    assert cmds[0].args[-1] == "run_dir=s3://bucket/run1"  # the continuation lines joined
    assert cmds[1].args[-1] == "train_p.no_such_key=1"  # the comment is not an argument
    assert [k.key for k in keys(BAD_DOC)] == [
        "train_p.optim.learning_rate",
        "contextual.engine.base_url",
        "run.storage_path",
        "tuna_ray.models.resolve_model",  # bare: skipped, tuna_ray is no config's field
        "report.md",  # bare: skipped, report is no config's field
        "servers.<name>",
        "train.mode",
        "train.mode",
    ]

    found = problems(BAD_DOC, "bad.md")
    assert len(found) == 7, "\n".join(found)
    assert found[0].startswith("bad.md:7: `tuna-ray run") and "no_such_key" in found[0]
    assert found[1].startswith("bad.md:8: ") and "jobs/nope.py does not exist" in found[1]
    assert found[2].startswith("bad.md:12: `run.storage_path`: run.storage_path is not a config")
    assert "PipelineConfig has no field 'run'" in found[2]
    assert found[3].startswith("bad.md:14: `train.mode=sft`")  # not on `tuna-ray train`'s line
    assert found[4] == "bad.md:8: jobs/nope.py does not exist"
    assert found[5] == "bad.md:15: jobs/configs/missing.yaml does not exist"
    pinned = _pyproject_pins()["vllm"]
    assert found[6] == f"bad.md:15: vllm==0.0.1, but pyproject.toml pins vllm=={pinned}"


def test_a_stage_key_the_pipeline_fills_in_is_reported():
    why = check_key("probabilistic.output_dir", [PipelineConfig])
    assert why and "filled in by the pipeline" in why
    assert check_key("input.limit", [PipelineConfig])  # only the stage commands take it
    assert check_key("input.limit", [PipelineConfig, _roots()["sample"]]) is None
    assert check_key("scaling.gpus_per_actor", [PipelineConfig]) is None  # a stage section's
    assert check_key("sampling.engine.tensor_parallel_size", [PipelineConfig]) is None


def test_the_stage_sections_are_what_plan_makes_of_them():
    """STAGE_SECTIONS and PIPELINE_FILLS say what pipeline/stages.py does: each section becomes
    its stage's config, and its input/output_dir are overwritten (run_dir/<stage>/)."""
    overrides = [f"{s}.output_dir=/elsewhere" for s in STAGE_SECTIONS]
    overrides += [f"{s}.input.path=/elsewhere" for s in STAGE_SECTIONS]
    cfg = load_config(ROOT / "jobs/configs/tiny-cpu.yaml", overrides, PipelineConfig)
    stages = {s.name: s for s in plan(cfg)}
    for stage_name, model in STAGE_SECTIONS.values():
        config = stages[stage_name].config
        assert type(config) is model
        assert set(PIPELINE_FILLS) <= set(type(config).model_fields)
        assert config.output_dir.endswith(stage_name) and "elsewhere" not in config.output_dir
        assert config.input.path != "/elsewhere"

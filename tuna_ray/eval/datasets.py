"""Evaluation sets: the shipped ones (``builtin:...``) and the user's files, as plain records.

Stage: eval (no Ray). Every loader returns records with a stable ``id`` so generation and
judging resume by id like the other stages.

Pairwise sets (``load_pairwise_set``) -> ``{id, instruction, input, reference, category}``:

- ``builtin:vicuna_qa/<answers>``: the 80 Vicuna QA questions (ids ``vicuna_qa-<question_id>``)
  with the shipped answers of ``<answers>`` as references (``answer_<answers>.jsonl``: gpt35,
  bard, alpaca-13b, llama-13b, vicuna-13b, ...);
- ``builtin:alpaca_eval_sample/<generator>``: the shipped first 100 AlpacaEval instructions with
  the outputs of ``text_davinci_003`` or ``gpt4_1106_preview`` (CC BY-NC 4.0 sample);
- ``format: alpaca_eval``: an AlpacaEval ``model_outputs.json`` (a JSON list of
  ``{instruction, output, generator, dataset}``); ids ``alpaca_eval-<index>`` (0-based, as in
  jobs/data/alpaca_eval_ranked_64.jsonl), references = ``output``;
- ``format: fastchat``: FastChat questions (``{question_id, text}`` or ``{question_id,
  turns}``; first turn) at ``path`` and answers (``{question_id, text}`` or ``{question_id,
  choices: [{turns}]}``) at ``references``; ids ``question-<question_id>``;
- ``format: instructions``: instruction records (tuna_ray.data.readers.read_instructions:
  JSONL / JSON / Parquet; Alpaca's ``output`` is the reference), each needing a reference.

``auto`` picks ``alpaca_eval`` for a ``.json`` list whose first item has ``instruction``,
``output`` and ``generator``, else ``instructions``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tuna_ray.eval.config import PairwiseData, RougeLData
from tuna_ray.eval.superni import SuperNIError, load_task, zero_shot_prompt

BUILTIN = "builtin:"


class EvalDataError(ValueError):
    """An evaluation set that cannot be read; names the path and the problem."""


def asset(*parts: str) -> Path:
    """A file shipped under tuna_ray/assets/eval (a real path: the package is installed)."""
    return Path(str(resources.files("tuna_ray").joinpath("assets", "eval", *parts)))


@dataclass(frozen=True)
class PairwiseSet:
    records: list[dict]  # {id, instruction, input, reference, category}
    reference_name: str | None
    source: str


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    except (OSError, ValueError) as exc:
        raise EvalDataError(f"{path}: cannot read JSON lines: {exc}") from exc


def _first_turn(item: dict, path: Path) -> str:
    if isinstance(item.get("text"), str):
        return item["text"]
    turns = item.get("turns")
    if not turns and item.get("choices"):
        turns = item["choices"][0].get("turns")
    if turns and isinstance(turns[0], str):
        return turns[0]
    raise EvalDataError(f"{path}: question {item.get('question_id')} has no 'text' or 'turns'")


def _fastchat(questions: Path, answers: Path, prefix: str) -> tuple[list[dict], str | None]:
    by_id = {a.get("question_id"): a for a in _jsonl(answers)}
    records, name = [], None
    for q in _jsonl(questions):
        qid = q.get("question_id")
        if qid not in by_id:
            raise EvalDataError(f"{answers}: no answer to question {qid}")
        name = name or by_id[qid].get("model_id")
        records.append(
            {
                "id": f"{prefix}-{qid}",
                "instruction": _first_turn(q, questions),
                "input": "",
                "reference": _first_turn(by_id[qid], answers),
                "category": q.get("category") or "",
            }
        )
    return records, name


def _alpaca_eval(path: Path) -> tuple[list[dict], str | None]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvalDataError(f"{path}: cannot read the AlpacaEval outputs: {exc}") from exc
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("instruction"), str) for i in items
    ):
        raise EvalDataError(f"{path}: expected a JSON list of {{instruction, output, ...}}")
    records = []
    for k, item in enumerate(items):
        if not isinstance(item.get("output"), str):
            raise EvalDataError(f"{path}: item {k} has no 'output' string")
        records.append(
            {
                "id": f"alpaca_eval-{k}",
                "instruction": item["instruction"],
                "input": "",
                "reference": item["output"],
                "category": item.get("dataset") or "",
            }
        )
    return records, (items[0].get("generator") if items else None)


def _instructions(path: str) -> list[dict]:
    from tuna_ray.data.readers import read_instructions

    result = read_instructions(path)
    missing = [r["id"] for r in result.records if not (r.get("reference") or "").strip()]
    if missing:
        raise EvalDataError(f"{path}: records without a reference answer: {missing[:5]}")
    return [
        {
            "id": r["id"],
            "instruction": r["instruction"],
            "input": r.get("input") or "",
            "reference": r["reference"],
            "category": r.get("source") or "",
        }
        for r in result.records
    ]


def _detect(path: Path) -> str:
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "instructions"  # the reader reports the problem with its context
        first = items[0] if isinstance(items, list) and items else {}
        if isinstance(first, dict) and {"instruction", "output", "generator"} <= set(first):
            return "alpaca_eval"
    return "instructions"


def _builtin_pairwise(name: str) -> tuple[list[dict], str | None]:
    kind, _, which = name.partition("/")
    if kind == "vicuna_qa":
        answers = asset("vicuna_qa", "answer", f"answer_{which}.jsonl")
        if not which or not answers.is_file():
            known = sorted(
                p.stem.removeprefix("answer_") for p in asset("vicuna_qa", "answer").iterdir()
            )
            raise EvalDataError(f"{BUILTIN}{name}: unknown answers {which!r}; known: {known}")
        return _fastchat(asset("vicuna_qa", "question.jsonl"), answers, "vicuna_qa")
    if kind == "alpaca_eval_sample":
        path = asset("alpaca_eval", "sample", f"model_outputs_{which}.json")
        if not which or not path.is_file():
            raise EvalDataError(
                f"{BUILTIN}{name}: unknown generator {which!r}; known: "
                "text_davinci_003, gpt4_1106_preview"
            )
        return _alpaca_eval(path)
    raise EvalDataError(
        f"{BUILTIN}{name}: unknown set; known: vicuna_qa/<answers>, alpaca_eval_sample/<generator>"
    )


def load_pairwise_set(data: PairwiseData) -> PairwiseSet:
    """The questions and reference answers of a ``pairwise_judge`` task (module docstring)."""
    if data.path.startswith(BUILTIN):
        records, name = _builtin_pairwise(data.path.removeprefix(BUILTIN))
    else:
        path = Path(data.path)
        if not path.exists():
            raise FileNotFoundError(f"pairwise data {data.path} does not exist")
        fmt = _detect(path) if data.format == "auto" else data.format
        if fmt == "fastchat":
            if data.references is None:
                raise EvalDataError(f"{data.path}: format fastchat needs data.references")
            records, name = _fastchat(path, Path(data.references), "question")
        elif fmt == "alpaca_eval":
            records, name = _alpaca_eval(path)
        else:
            records, name = _instructions(data.path), None
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise EvalDataError(f"{data.path}: duplicate question ids")
    return PairwiseSet(records[: data.limit], data.reference_name or name, data.path)


def read_task_names(tasks_file: str) -> list[str]:
    """Task names, one per line (``builtin:super_ni/test_tasks.txt``: the 119 test tasks)."""
    path = (
        asset(*tasks_file.removeprefix(BUILTIN).split("/"))
        if tasks_file.startswith(BUILTIN)
        else Path(tasks_file)
    )
    if not path.is_file():
        raise FileNotFoundError(f"tasks_file {tasks_file} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_super_ni(data: RougeLData) -> list[dict]:
    """Instances of the chosen Super-NI tasks: ``{id, task, category, definition, input,
    references, prompt}`` (``prompt``: the zero-shot text, superni.zero_shot_prompt)."""
    root = Path(data.path)
    if not root.exists():
        raise FileNotFoundError(f"Super-NI data {data.path} does not exist")
    if root.is_file():
        files = [root]
    else:
        names = data.tasks or (read_task_names(data.tasks_file) if data.tasks_file else None)
        if names is None:
            files = sorted(root.glob("*.json"))
        else:
            files = [root / f"{n.removesuffix('.json')}.json" for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"Super-NI task files not found: {missing[:5]}")
        if not files:
            raise EvalDataError(f"{data.path}: no task files (*.json)")
    instances, seen = [], set()
    for f in files:
        try:
            task = load_task(f, data.instances_per_task)
        except SuperNIError as exc:
            raise EvalDataError(str(exc)) from exc
        for inst in task.instances:
            if inst["id"] in seen:
                raise EvalDataError(f"{f}: instance id {inst['id']} appears twice")
            seen.add(inst["id"])
            instances.append(
                {
                    **inst,
                    "task": task.name,
                    "category": task.category or "",
                    "definition": task.definition,
                    "prompt": zero_shot_prompt(task.definition, inst["input"]),
                }
            )
    return instances

"""Super-NI ROUGE-L / exact match (tuna_ray/eval/superni.py) on task files the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuna_ray.eval.config import RougeLData
from tuna_ray.eval.datasets import load_super_ni
from tuna_ray.eval.superni import (
    exact_match,
    normalize_answer,
    rouge_l,
    score_instance,
    score_super_ni,
    zero_shot_prompt,
)


def write_task(folder: Path, name: str, definition, instances, category="Title Generation"):
    """A task file in the official natural-instructions format."""
    task = {
        "Contributors": ["tests"],
        "Source": ["tests"],
        "Categories": [category],
        "Definition": definition,
        "Positive Examples": [{"input": "x", "output": "y", "explanation": "z"}],
        "Negative Examples": [],
        "Instances": [
            {"id": f"{name}-{k}", "input": inp, "output": outs}
            for k, (inp, outs) in enumerate(instances)
        ],
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(task))
    return path


def test_prompt_is_tk_instruct_zero_shot():
    assert zero_shot_prompt("Answer the question", "What is 2 + 2?") == (
        "Definition: Answer the question.\n\nNow complete the following example -\n"
        "Input: What is 2 + 2?\nOutput: "
    )
    # Text ending in punctuation gets no extra period; surrounding space is stripped.
    assert zero_shot_prompt(" Say it! ", " hi. ").startswith("Definition: Say it!\n\n")
    assert zero_shot_prompt(" Say it! ", " hi. ").endswith("Input: hi.\nOutput: ")


def test_normalisation_is_squad_without_removing_articles():
    assert normalize_answer("  The Cat's   HAT!\n") == "the cats hat"
    assert exact_match("The answer.", "the answer")
    assert not exact_match("a cat", "cat")  # articles stay (official compute_metrics)
    assert exact_match("Yes", "yes!")


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" is 5 of 6 tokens each.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # Default tokenizer: lower-case, punctuation dropped; Porter stemming (running -> run).
    assert rouge_l("Running dogs!", "run dog") == pytest.approx(1.0)
    assert rouge_l("", "anything") == 0.0
    # P = 2/2, R = 2/4: F = 2PR / (P + R) = 2/3.
    assert rouge_l("red apple", "a red big apple") == pytest.approx(2 / 3)
    # Per instance: the best reference.
    assert score_instance("red apple", ["blue sky", "a red big apple", "red apple"]) == (1.0, True)


def test_tasks_first_n_instances_scored_per_task_and_overall(tmp_path):
    write_task(
        tmp_path,
        "task001_colours",
        ["Name the colour"],
        [("sky", ["blue"]), ("grass", ["green", "Green."]), ("snow", ["white"]), ("x", ["y"])],
    )
    write_task(
        tmp_path,
        "task002_animals",
        "Name the animal.",
        [("barks", ["a dog"]), ("meows", ["cat"])],
        category="Answer Generation",
    )
    write_task(tmp_path, "task003_unused", ["Unused"], [("a", ["b"])])
    data = RougeLData(
        path=str(tmp_path), tasks=["task001_colours", "task002_animals"], instances_per_task=3
    )
    instances = load_super_ni(data)
    assert [i["id"] for i in instances] == [
        "task001_colours-0", "task001_colours-1", "task001_colours-2",
        "task002_animals-0", "task002_animals-1",
    ]  # fmt: skip
    assert instances[0]["prompt"] == (
        "Definition: Name the colour.\n\nNow complete the following example -\n"
        "Input: sky.\nOutput: "
    )
    predictions = {
        "task001_colours-0": "Blue",  # EM, ROUGE 1
        "task001_colours-1": "green grass",  # ROUGE 2/3 against "green"; no EM
        # task001_colours-2 missing: scored as "" -> 0
        "task002_animals-0": "dog",  # "a dog" vs "dog": ROUGE 2/3, no EM (articles count)
        "task002_animals-1": "Cat!",  # EM
    }
    result = score_super_ni(instances, predictions, resamples=200)
    rouges = [1.0, 2 / 3, 0.0, 2 / 3, 1.0]
    assert result["rouge_l"] == pytest.approx(100 * sum(rouges) / 5)
    assert result["exact_match"] == pytest.approx(100 * 2 / 5)
    assert result["missing"] == 1 and result["n"] == 5 and result["tasks"] == 2
    assert result["per_task"]["task001_colours"]["rouge_l"] == pytest.approx(100 * (5 / 3) / 3)
    assert result["per_task"]["task002_animals"]["exact_match"] == pytest.approx(50.0)
    assert result["per_category"]["Answer Generation"]["n"] == 2
    assert result["ci"][0] <= result["rouge_l"] <= result["ci"][1]


def test_bad_task_files_are_named(tmp_path):
    (tmp_path / "task9_bad.json").write_text(json.dumps({"Definition": ["d"], "Instances": []}))
    with pytest.raises(ValueError, match="task9_bad.json: no 'Instances'"):
        load_super_ni(RougeLData(path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="task404"):
        load_super_ni(RougeLData(path=str(tmp_path), tasks=["task404"]))


def test_shipped_test_task_list_is_the_official_119():
    from tuna_ray.eval.datasets import read_task_names

    names = read_task_names("builtin:super_ni/test_tasks.txt")
    assert len(names) == 119 and len(set(names)) == 119
    assert all(n.startswith("task") for n in names)

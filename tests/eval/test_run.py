"""Evaluation end to end, in-process on a local Ray: the tiny model generates through Ray Data
actors, a scripted judge answers the real ``openai`` client over loopback HTTP, ranked answers
are scored with the Tuna score and checked against a direct forward pass.

One evaluation (module fixture ``evaluated``) runs all three task kinds for two models with the
same weights ("tiny" and "tiny-again"): the second is served entirely from ``cache_dir``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.eval.test_superni import write_task
from tests.support import write_jsonl
from tuna_ray.eval import EvalConfig, run_eval
from tuna_ray.eval.superni import rouge_l

pytestmark = pytest.mark.slow

QUESTIONS = [f"Say something about topic {k}." for k in range(6)]
SHORT, LONG = "x", "y" * 3000

RANKED = [
    {"id": "r0", "instruction": "Name a fruit.", "input": "",
     "responses": ["An apple is a fruit.", "Apple.", "Car."]},
    {"id": "r1", "instruction": "Add the numbers.", "input": "2 and 3",
     "responses": ["Sum: five.", "It is six."]},  # same length: the length baseline ties
    {"id": "r2", "instruction": "Greet me.", "input": "",
     "responses": ["Hello there, nice to meet you!", "Hi.", "Bye.", "No."]},
    {"id": "r3", "instruction": "What colour is the sky?", "input": "",
     "responses": ["Blue on a clear day.", "Green."]},
]  # fmt: skip


def _pairwise_data(path: Path, references: list[str]) -> Path:
    return write_jsonl(
        path,
        [
            {"id": f"q{k}", "instruction": q, "input": "", "reference": r}
            for k, (q, r) in enumerate(zip(QUESTIONS, references))
        ],
    )


def _config(root: Path, tiny: Path, judge_url: str) -> EvalConfig:
    model = {"name_or_path": str(tiny), "template": "chat", "generation": {"max_tokens": 12}}
    return EvalConfig.model_validate(
        {
            "models": [{**model, "label": "tiny"}, {**model, "label": "tiny-again"}],
            "tasks": [
                {
                    "name": "qa",
                    "kind": "pairwise_judge",
                    "data": {"path": str(root / "qa.jsonl")},
                    "judge": {
                        "engine": {"base_url": judge_url, "model": "judge", "max_retries": 1},
                        "template": "tuna_contextual",
                    },
                },
                {
                    "name": "superni",
                    "kind": "rouge_l",
                    "data": {"path": str(root / "tasks"), "instances_per_task": 2},
                    "generation": {"max_tokens": 6},
                },
                {
                    "name": "ranked",
                    "kind": "ranking_agreement",
                    "data": {"path": str(root / "ranked.jsonl")},
                },
            ],
            "output_dir": str(root / "out"),
            "cache_dir": str(root / "cache"),
            "scaling": {"actors": 1, "batch_size": 4},
            "bootstrap": {"resamples": 200},
        }
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_path, ray_session, length_judge):
    """(root folder, config, results, judge requests) of the first evaluation."""
    root = tmp_path_factory.mktemp("eval")
    (root / "tasks").mkdir()
    write_task(root / "tasks", "task1_echo", ["Repeat the input"], [("a b", ["a b"])] * 3)
    write_task(root / "tasks", "task2_count", "Count the words", [("x y z", ["3"])] * 2)
    _pairwise_data(root / "qa.jsonl", [SHORT, LONG, SHORT, LONG, SHORT, SHORT])
    write_jsonl(root / "ranked.jsonl", RANKED)
    cfg = _config(root, tiny_model_path, length_judge.base_url)
    length_judge.reset_stats()
    results = run_eval(cfg)["models"]
    return root, cfg, results, length_judge.stats()["requests"]


def _expected_outcome(answer: str, reference: str) -> float:
    """The scripted length judge in both orders: longer wins; at equal length each order
    picks the answer shown first, which the two orders cancel to a tie."""
    if len(answer) != len(reference):
        return 1.0 if len(answer) > len(reference) else 0.0
    return 0.5


def test_pairwise_and_rouge_l_through_ray_and_http(evaluated, length_judge):
    root, cfg, results, judge_requests = evaluated
    qa = results["tiny"]["tasks"]["qa"]
    gen_dir = Path(qa["generation"]["output_dir"])
    answers = {r["id"]: r["answer"] for r in pq.read_table(gen_dir / "answers.parquet").to_pylist()}
    assert sorted(answers) == [f"q{k}" for k in range(6)]
    assert qa["generation"]["sampling"]["temperature"] == 0.0  # greedy, recorded
    assert qa["generation"]["sampling"]["max_tokens"] == 12
    assert judge_requests == 12  # both orders of 6 questions, for one of the two models
    assert results["tiny-again"]["tasks"]["qa"]["cached"]

    # Second run: questions 4 and 5 get a reference as long as the model's answer (different
    # text), so the judge's preference for position A decides them -- and both orders cancel it.
    refs = [SHORT, LONG, SHORT, LONG, "#" * len(answers["q4"]), "%" * len(answers["q5"])]
    assert all(r != answers[f"q{k}"] for k, r in enumerate(refs))
    _pairwise_data(root / "qa.jsonl", refs)
    gen_manifest = (gen_dir / "manifest.json").read_text()
    length_judge.reset_stats()
    second = run_eval(cfg)["models"]
    assert (gen_dir / "manifest.json").read_text() == gen_manifest  # answers reused
    assert length_judge.stats()["requests"] == 12
    tasks = second["tiny"]["tasks"]
    assert tasks["superni"]["cached"] and not tasks["qa"]["cached"]
    qa = tasks["qa"]
    expected = [_expected_outcome(answers[f"q{k}"], r) for k, r in enumerate(refs)]
    assert qa["win_rate"] == pytest.approx(100 * sum(expected) / 6)
    assert (qa["wins"], qa["ties"], qa["losses"]) == (
        expected.count(1.0),
        expected.count(0.5),
        expected.count(0.0),
    )
    ties = sum(e == 0.5 for e in expected)
    assert ties >= 2 and qa["inconsistent"] == pytest.approx(ties / 6)
    # Decisive verdicts: 2 per decided question, half of them for position A; 2 per tie, both
    # for position A.
    assert qa["first_position_rate"] == pytest.approx((6 - ties + 2 * ties) / 12)
    assert qa["avg_length"] == pytest.approx(sum(len(a) for a in answers.values()) / 6)
    assert qa["reference_avg_length"] == pytest.approx(sum(map(len, refs)) / 6)
    assert qa["ci"][0] <= qa["win_rate"] <= qa["ci"][1]
    assert qa["judge"]["template"] == "tuna_contextual" and qa["judge"]["aggregate"] == "consistent"
    judged = pq.read_table(root / "out" / "tiny" / "qa" / "judge" / "judgments.parquet")
    assert all(len(json.loads(j["judge_raw"])) == 2 for j in judged.to_pylist())
    assert second["tiny-again"]["tasks"]["qa"]["win_rate"] == qa["win_rate"]  # from cache_dir

    # Super-NI: every instance has the model's answer, scored with the official ROUGE-L.
    sn = tasks["superni"]
    assert (sn["n"], sn["tasks"], sn["missing"]) == (4, 2, 0)
    preds = pq.read_table(Path(sn["generation"]["output_dir"]) / "answers.parquet").to_pylist()
    refs_by_task = {"task1_echo": "a b", "task2_count": "3"}
    direct = [100 * rouge_l(p["answer"], refs_by_task[p["id"].rsplit("-", 1)[0]]) for p in preds]
    assert sn["rouge_l"] == pytest.approx(sum(direct) / 4)

    # Third run, nothing changed: every task comes from its result file, no judge call.
    length_judge.reset_stats()
    third = run_eval(cfg)["models"]
    assert all(t["cached"] for m in third.values() for t in m["tasks"].values())
    assert third["tiny"]["tasks"]["qa"]["win_rate"] == qa["win_rate"]
    assert length_judge.stats()["requests"] == 0
    top = json.loads((root / "out" / "results.json").read_text())
    assert set(top["models"]) == {"tiny", "tiny-again"}
    assert set(top["models"]["tiny"]["tasks"]) == {"qa", "superni", "ranked"}


def _direct_scores(model_dir: Path, records: list[dict], template: str) -> list[list[float]]:
    """Mean log-prob of answer tokens + EOS after the prompt: one plain forward per answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuna_ray.data.templates import render_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    special = template == "alpaca"
    out = []
    for rec in records:
        prompt = render_prompt(rec["instruction"], rec["input"], template=template, tokenizer=tok)
        p_ids = tok(prompt, add_special_tokens=special)["input_ids"]
        scores = []
        for answer in rec["responses"]:
            full = tok(prompt + answer, add_special_tokens=special)["input_ids"]
            assert full[: len(p_ids)] == p_ids  # the prompt's tokens do not merge into the answer
            ids = full + [tok.eos_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])
            scores.append(float(logp[len(p_ids) - 1 :].mean()))
        out.append(scores)
    return out


def test_ranking_agreement_matches_a_direct_computation(evaluated, tiny_model_path):
    root, _, results, _ = evaluated
    got = results["tiny"]["tasks"]["ranked"]
    direct = _direct_scores(tiny_model_path, RANKED, "chat")
    stored = pq.read_table(root / "out" / "tiny" / "ranked" / "score" / "scores.parquet")
    by_id = {r["id"]: r["scores"] for r in stored.to_pylist()}
    for rec, scores in zip(RANKED, direct):
        assert by_id[rec["id"]] == pytest.approx(scores, abs=1e-4)
    agree = pairs = 0
    for s in direct:  # ordered pairs j < k (j given as better), ties half
        for j in range(len(s)):
            for k in range(j + 1, len(s)):
                pairs += 1
                agree += 1.0 if s[j] > s[k] else 0.5 if s[j] == s[k] else 0.0
    assert got["agreement"] == pytest.approx(agree / pairs)
    assert got["pairs"] == pairs == 3 + 1 + 6 + 1
    # "Longer is better" by hand: r0 3 of 3; r1 a tie (0.5); r2 all but "Hi." < "Bye." (0)
    # and "Hi." = "No." (0.5): 4.5 of 6; r3 1 of 1.
    assert got["length_baseline"] == pytest.approx((3 + 0.5 + 4.5 + 1) / 11)
    # Same fingerprint, template and items: served from cache_dir, not scored again.
    again = results["tiny-again"]["tasks"]["ranked"]
    assert again["cached"] and again["agreement"] == got["agreement"]
    assert not (root / "out" / "tiny-again" / "ranked" / "score").exists()
    table = (root / "out" / "comparison.md").read_text()
    assert "| tiny | " in table and "| tiny-again | " in table

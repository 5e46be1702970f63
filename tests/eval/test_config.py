"""Eval config validation, shipped sets and configs, fingerprints and digests, the table."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tuna_ray.config import load_config
from tuna_ray.eval import EvalConfig, embedded_servers, model_fingerprint, render_comparison
from tuna_ray.eval.config import PairwiseData
from tuna_ray.eval.datasets import EvalDataError, load_pairwise_set

RANKING = {
    "name": "ranked",
    "kind": "ranking_agreement",
    "data": {"path": "jobs/data/alpaca_eval_ranked_64.jsonl"},
}
JUDGE = {"engine": {"base_url": "embedded:judge", "model": "judge"}}


def test_contract_form_and_defaults():
    cfg = EvalConfig.model_validate(
        {"model": {"name_or_path": "m", "template": "chat"}, "tasks": [RANKING], "output_dir": "o"}
    )
    model = cfg.model_list()[0]
    assert model.display_label == "m" and model.generation.n == 1
    assert model.generation.temperature == 0.0  # greedy unless asked
    assert (
        EvalConfig.model_validate(
            {"model": {"name_or_path": "builtin:tiny-llama"}, "tasks": [RANKING]}
        ).model.display_label
        == "tiny-llama"
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"tasks": [RANKING]}, "exactly one of 'model'"),
        ({"model": {"name_or_path": "a"}, "models": [{"name_or_path": "b"}], "tasks": [RANKING]},
         "exactly one of 'model'"),
        ({"models": [{"name_or_path": "x/a"}, {"name_or_path": "y/a"}], "tasks": [RANKING]},
         "labels must differ"),
        ({"model": {"name_or_path": "a"}, "tasks": [RANKING, RANKING]}, "task names must differ"),
        ({"model": {"name_or_path": "a"}, "tasks": [{**RANKING, "name": "../up"}]}, "pattern"),
        ({"model": {"name_or_path": "a"}, "tasks": [{**RANKING, "kind": "bleu"}]}, "bleu"),
        ({"model": {"name_or_path": "a", "generation": {"n": 4}}, "tasks": [RANKING]}, "n"),
        ({"model": {"name_or_path": "a"}, "tasks": [{"name": "p", "kind": "pairwise_judge",
          "data": {"path": "x"}, "judge": {**JUDGE, "sampling": {"temprature": 0}}}]},
         "temprature"),
        ({"model": {"name_or_path": "a"}, "tasks": [{"name": "p", "kind": "pairwise_judge",
          "data": {"path": "x"}, "judge": {"engine": {"kind": "hf", "model": "j"}}}]}, "openai"),
    ],
)  # fmt: skip
def test_bad_configs_fail_before_any_work(bad, message):
    with pytest.raises(ValidationError, match=message):
        EvalConfig.model_validate(bad)


def test_engine_defaults_to_the_model_and_overrides_merge():
    cfg = EvalConfig.model_validate(
        {
            "model": {
                "name_or_path": "some/model",
                "engine": {"device": "cuda", "dtype": "bfloat16"},
                "generation": {"max_tokens": 64},
            },
            "tasks": [
                {"name": "p", "kind": "pairwise_judge", "data": {"path": "x"}, "judge": JUDGE,
                 "generation": {"temperature": 0.7}},
            ],
        }
    )  # fmt: skip
    assert cfg.model.engine.kind == "hf" and cfg.model.engine.model == "some/model"
    from tuna_ray.eval.config import merged_sampling

    merged = merged_sampling(cfg.model.generation, cfg.tasks[0].generation)
    assert (merged.temperature, merged.max_tokens, merged.n) == (0.7, 64, 1)
    assert embedded_servers(cfg) == {"judge"}


def test_shipped_configs_validate():
    for name in ("eval-ranking-agreement-cpu", "eval-pairwise-cpu", "eval-llama-7b"):
        cfg = load_config(f"jobs/configs/{name}.yaml", [], EvalConfig)
        assert cfg.tasks
    seven_b = load_config("jobs/configs/eval-llama-7b.yaml", [], EvalConfig)
    judges = [t.judge for t in seven_b.tasks if t.kind == "pairwise_judge"]
    assert [j.template for j in judges] == ["fastchat_pair_v2", "alpaca_eval_gpt4"]
    assert all(j.engine.api_key_env == "OPENAI_API_KEY" for j in judges)


def test_shipped_sets():
    vicuna = load_pairwise_set(PairwiseData(path="builtin:vicuna_qa/gpt35"))
    assert len(vicuna.records) == 80 and vicuna.reference_name == "gpt-3.5-turbo:20230327"
    assert vicuna.records[0]["id"] == "vicuna_qa-1"
    assert vicuna.records[0]["instruction"] == "How can I improve my time management skills?"
    assert all(r["reference"].strip() for r in vicuna.records)
    sample = load_pairwise_set(
        PairwiseData(path="builtin:alpaca_eval_sample/gpt4_1106_preview", limit=10)
    )
    assert len(sample.records) == 10 and sample.reference_name == "gpt4_1106_preview"
    assert sample.records[6]["id"] == "alpaca_eval-6"  # the ids of jobs/data/alpaca_eval_ranked_64
    with pytest.raises(EvalDataError, match="known"):
        load_pairwise_set(PairwiseData(path="builtin:vicuna_qa/gpt5"))


def test_user_sets_alpaca_eval_and_fastchat_formats(tmp_path):
    outputs = [{"instruction": f"Q{k}", "output": f"A{k}", "generator": "base", "dataset": "d"}
               for k in range(3)]  # fmt: skip
    (tmp_path / "outputs.json").write_text(json.dumps(outputs))
    s = load_pairwise_set(PairwiseData(path=str(tmp_path / "outputs.json")))
    assert [r["id"] for r in s.records] == ["alpaca_eval-0", "alpaca_eval-1", "alpaca_eval-2"]
    assert s.records[2]["reference"] == "A2" and s.reference_name == "base"
    (tmp_path / "q.jsonl").write_text(
        '{"question_id": 7, "turns": ["Hi?"], "category": "x"}\n'
        '{"question_id": 9, "turns": ["Bye?"], "category": "y"}\n'
    )
    (tmp_path / "a.jsonl").write_text(
        '{"question_id": 9, "model_id": "m", "choices": [{"turns": ["Bye."]}]}\n'
        '{"question_id": 7, "model_id": "m", "choices": [{"turns": ["Hi."]}]}\n'
    )
    data = PairwiseData(path=str(tmp_path / "q.jsonl"), format="fastchat",
                        references=str(tmp_path / "a.jsonl"))  # fmt: skip
    s = load_pairwise_set(data)
    assert [(r["id"], r["reference"]) for r in s.records] == [
        ("question-7", "Hi."),
        ("question-9", "Bye."),
    ]
    (tmp_path / "noref.jsonl").write_text('{"id": "a", "instruction": "x"}\n')
    with pytest.raises(EvalDataError, match="without a reference"):
        load_pairwise_set(PairwiseData(path=str(tmp_path / "noref.jsonl")))


def test_fingerprint_follows_the_weights(tmp_path):
    from tuna_ray.eval.config import EvalModelConfig

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * (9 << 20))  # "large": head and tail
    a = model_fingerprint(EvalModelConfig(name_or_path=str(folder)))
    assert a == model_fingerprint(EvalModelConfig(name_or_path=str(folder), label="other"))
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek((9 << 20) - 10)
        f.write(b"\1")  # a change in the last MiB
    assert model_fingerprint(EvalModelConfig(name_or_path=str(folder))) != a
    assert model_fingerprint(EvalModelConfig(name_or_path="org/hub-id")) == "hub:org/hub-id"
    given = EvalModelConfig(name_or_path=str(folder), fingerprint="train_c:abc")
    assert model_fingerprint(given) == "train_c:abc"


def test_table_from_results_files(tmp_path):
    def results(label, win, agreement):
        return {
            "model": {"label": label},
            "tasks": {
                "vicuna": {"kind": "pairwise_judge", "win_rate": win, "ci": [win - 5, win + 5],
                           "lc_win_rate": win - 1, "lc_ci": [win - 7, win + 4], "wins": 3,
                           "ties": 1, "losses": 2, "n": 6, "avg_length": 812.4,
                           "reference_avg_length": 1020.0, "data": {"reference": "gpt35"},
                           "judge": {"engine": {"model": "gpt-4o"}, "template": "fastchat_pair_v2",
                                     "aggregate": "consistent"}},
                "ranked": {"kind": "ranking_agreement", "agreement": agreement, "ci": [0.5, 0.7],
                           "length_baseline": 0.9, "length_baseline_ci": [0.85, 0.95],
                           "pairs": 192, "records": 64},
            },
        }  # fmt: skip

    (tmp_path / "a.json").write_text(json.dumps(results("alpaca-7b", 41.25, 0.6)))
    both = {"models": {"tuna-7b": results("tuna-7b", 55.0, 0.71)}}
    table = render_comparison([str(tmp_path / "a.json"), both])
    assert "| model | vicuna: win rate % | ranked: agreement % |" in table
    assert "| alpaca-7b | 41.2 [36.2, 46.2] | 60.0 [50.0, 70.0] |" in table
    assert "| tuna-7b | 55.0 [50.0, 60.0] | 71.0 [50.0, 70.0] |" in table
    assert "| alpaca-7b | vicuna | 41.2 [36.2, 46.2] | 40.2 [34.2, 45.2] | 3 / 1 / 2 | 6 |" in table
    assert "812 / 1020 | gpt35 | gpt-4o (fastchat_pair_v2, consistent) |" in table
    assert "| tuna-7b | ranked | 71.0 [50.0, 70.0] | 90.0 [85.0, 95.0] | 192 | 64 |" in table

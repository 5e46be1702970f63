"""Pairwise judging core: prompts, verdict parsers, both orders, the win rate (hand-computed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuna_ray.eval.pairwise import (
    combine_orders,
    model_outcome,
    parse_alpaca_eval,
    parse_fastchat,
    parse_tuna_contextual,
    parse_verdict,
    render_pairwise,
    score_pairwise,
)


def test_fastchat_prompt_is_pair_v2_filled_once():
    messages = render_pairwise("fastchat_pair_v2", "Why?", "", "Because {answer_b}.", "Dunno.")
    pair_v2 = json.loads(
        Path("tuna_ray/assets/eval/vicuna_qa/judge_prompts.jsonl").read_text().splitlines()[0]
    )
    assert pair_v2["name"] == "pair-v2"
    assert messages[0] == {"role": "system", "content": pair_v2["system_prompt"]}
    assert messages[1]["content"] == pair_v2["prompt_template"].format(
        question="Why?", answer_a="Because {answer_b}.", answer_b="Dunno."
    )  # an answer holding a placeholder is not filled in again


def test_alpaca_eval_prompt_is_the_annotator_file_as_messages():
    messages = render_pairwise("alpaca_eval_gpt4", "Name a colour.", "", "Red.", "Blue.")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("You are a helpful assistant, that ranks models")
    user = messages[1]["content"]
    assert '"instruction": """Name a colour.""",' in user
    assert '"model": "model_1",\n        "answer": """Red."""' in user
    assert '"model": "model_2",\n        "answer": """Blue."""' in user
    assert "{output_1}" not in user and "<|im_end|>" not in user


def test_tuna_contextual_prompt_shows_two_responses_in_the_paper_format():
    messages = render_pairwise("tuna_contextual", "Add.", "2 3", "5", "six")
    user = messages[1]["content"]
    assert (
        "### Input:\n2 3\n\n### Response:\n\n###Response 0:\n5\n\n###Response 1:\nsix\n\n\n" in user
    )
    assert "generate one high quality '###Response 2'" in user


def test_fastchat_verdicts():
    assert parse_fastchat("Both fine, but A is deeper. [[A]]") == "first"
    assert parse_fastchat("[[B]]") == "second"
    assert parse_fastchat("The format is [[A]]/[[B]]/[[C]]; here: [[C]]") == "tie"
    assert parse_fastchat("I started with [[B]] but my final verdict: [[A]]") == "first"
    with pytest.raises(ValueError):
        parse_fastchat("Assistant A is better.")


def test_alpaca_eval_verdicts():
    first = "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"
    assert parse_alpaca_eval(first) == "first"
    assert parse_alpaca_eval("```python\n[{'model': 'model_2', 'rank': 1},\n"
                             " {'model': 'model_1', 'rank': 2}]\n```") == "second"  # fmt: skip
    for bad in (
        "model_1 is better",
        "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 1}]",
        "[{'model': 'model_1', 'rank': 3}]",
        "[{'model': 'model_3', 'rank': 1}]",
        "[1, 2]",
    ):
        with pytest.raises(ValueError):
            parse_alpaca_eval(bad)


def test_tuna_contextual_verdicts():
    assert parse_tuna_contextual("Response 0: 9\nResponse 1: 12\nrank: [2, 1, 0]") == "second"
    assert parse_tuna_contextual("rank: [0, 2, 1]") == "first"
    # Response 1 dropped as a duplicate of Response 0: the two answers tie.
    assert parse_tuna_contextual("Response 1 is a duplicate of Response 0.\nrank: [2, 0]") == "tie"
    with pytest.raises(ValueError):
        parse_tuna_contextual("rank: [0, 3, 1]")  # no Response 3: never a wrong verdict
    assert parse_verdict("tuna_contextual", "rank: [1, 2, 0]") == "second"


def test_outcomes_and_both_orders_by_hand():
    assert [model_outcome(v, True) for v in ("first", "second", "tie")] == [1.0, 0.0, 0.5]
    assert [model_outcome(v, False) for v in ("first", "second", "tie")] == [0.0, 1.0, 0.5]
    table = {  # (model shown first, reference shown first) -> (consistent, mean)
        (1.0, 1.0): (1.0, 1.0),
        (0.0, 0.0): (0.0, 0.0),
        (1.0, 0.0): (0.5, 0.5),  # the judge picked position A both times
        (1.0, 0.5): (0.5, 0.75),
        (0.5, 0.0): (0.5, 0.25),
        (0.5, 0.5): (0.5, 0.5),
    }
    for (a, b), (consistent, mean) in table.items():
        assert combine_orders(a, b, "consistent") == consistent
        assert combine_orders(a, b, "mean") == mean


def _item(model_first, reference_first, answer="aaaa", reference="bb"):
    return {
        "model_first": model_first,
        "reference_first": reference_first,
        "answer": answer,
        "reference": reference,
    }


def test_win_rate_ties_half_and_lengths_by_hand():
    items = [
        _item("first", "second"),  # model wins in both orders
        _item("first", "first"),  # position A both times: cancelled
        _item("tie", "tie"),
        _item("second", "first", answer="a", reference="bbbbbbb"),  # loses both
        _item("first", "tie"),  # win + tie
    ]
    c = score_pairwise(items, rule="consistent", resamples=200)
    assert c["win_rate"] == pytest.approx(100 * (1 + 0.5 + 0.5 + 0 + 0.5) / 5)
    assert (c["wins"], c["ties"], c["losses"], c["n"]) == (1, 3, 1, 5)
    m = score_pairwise(items, rule="mean", resamples=200)
    assert m["win_rate"] == pytest.approx(100 * (1 + 0.5 + 0.5 + 0 + 0.75) / 5)
    assert c["inconsistent"] == pytest.approx(2 / 5)  # questions 2 and 5
    # Decisive verdicts: F,S | F,F | - | S,F | F  -> 5 of 7 picked the first position.
    assert c["first_position_rate"] == pytest.approx(5 / 7)
    assert c["avg_length"] == pytest.approx((4 * 4 + 1) / 5)
    assert c["reference_avg_length"] == pytest.approx((2 * 4 + 7) / 5)
    assert c["ci"][0] <= c["win_rate"] <= c["ci"][1]


def test_a_judge_biased_to_one_position_cannot_move_the_win_rate():
    # The true preference per question; the judge reports it when there is one, and on
    # undecided questions always picks whatever is shown first.
    truth = ["model"] * 12 + ["reference"] * 5 + ["none"] * 13

    def biased_judge(shown_first: str, shown_second: str, winner: str) -> str:
        if winner == "none":
            return "first"
        return "first" if winner == shown_first else "second"

    items = [
        _item(biased_judge("model", "reference", t), biased_judge("reference", "model", t))
        for t in truth
    ]
    for rule in ("consistent", "mean"):
        result = score_pairwise(items, rule=rule, resamples=100)
        assert result["win_rate"] == pytest.approx(100 * (12 + 0.5 * 13) / 30)
    # Asked in one order only, the same judge would have reported 25 wins of 30.
    assert sum(model_outcome(i["model_first"], True) for i in items) == 25


def test_bootstrap_interval_of_the_win_rate_is_seeded():
    items = [_item("first", "second")] * 7 + [_item("second", "first")] * 5
    a = score_pairwise(items, resamples=300, seed=11)
    b = score_pairwise(items, resamples=300, seed=11)
    c = score_pairwise(items, resamples=300, seed=12)
    assert a["ci"] == b["ci"] and a["lc_ci"] == b["lc_ci"]
    assert a["ci"] != c["ci"]
    assert a["win_rate"] == pytest.approx(100 * 7 / 12)

"""Contextual ranking core: judge prompt rendering, the reply parser, fold aggregation, records.

The parser table holds judge replies written by hand (a well-formed paper reply, the variants a
strong judge writes, and broken ones); property tests check the parser can never return a
wrong list.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuna_ray.ranking.contextual import (
    JUDGE_TEMPLATES,
    REFERENCE,
    aggregate_folds,
    borda,
    borda_points,
    build_contextual_record,
    judge_order,
    load_judge_template,
    map_to_original,
    pairwise_agreement,
    render_judge_messages,
)
from tuna_ray.ranking.judge_reply import (
    extract_reference_answer,
    find_reference_answer,
    parse_json_ranking,
    parse_judge_reply,
    parse_ranking,
)

# METHOD.md, "Contextual ranking details": the reference code's user message, verbatim
# (missing spaces after "responses." and "steps.", the " ,k" and the missing comma included).
PAPER_N4 = (
    "<PROMPT>\n"
    "\n"
    "###Response 0:\n"
    "<R0>\n"
    "\n"
    "###Response 1:\n"
    "<R1>\n"
    "\n"
    "###Response 2:\n"
    "<R2>\n"
    "\n"
    "###Response 3:\n"
    "<R3>\n"
    "\n"
    "\n"
    "We would like you to rate Response 0/1/2/3 in reply to the given instruction "
    "displayed above.\n"
    "First, identify if the instruction requires open-ended or close-ended "
    "responses.Second, you need to generate one high quality '###Response 4' in "
    "answer to the instruction. It needs to have the same format as other "
    "responses and will be used as a reference later.\n"
    "Third, identify if there are duplicate responses and keep only one of the "
    "duplicate responses for the following steps.Fourth, compare Response 4 with "
    "Response 0/1/2/3/4 and assign each response an overall score on a scale of 0 "
    "to 15 where a higher score indicates better overall quality. For an "
    "open-ended instruction, please rate based on the relevance (score 0 to 5), "
    "level of details/justification: (score 0 to 5) and accuracy (score 0 to 5) of "
    "each response; for a close-ended instruction, please rate based on the "
    "accuracy (score 0 to 5), level of details/justification (score 0 to 5) and "
    "clarity (score 0 to 5) of each response. The ratings should have the format: "
    "'Response k: [sum of the 3 individual scores you give to response k]'.\n"
    "Last, rank the responses in decreasing order of their overall scores. The "
    "ranking should have the format: 'rank: [i, j ,k, l, m]'. If there are "
    "duplicate responses, keep only one of them in the rank, that is, the ranking "
    "may become: 'rank: [i, j, k, l]', 'rank: [i, j, k]' 'rank: [i, j]' or even "
    "'rank: [i]'."
)

PAPER_REPLY = """The instruction requires close-ended responses.

###Response 4:
The capital of France is Paris.

Response 0 and Response 3 are duplicates; keep Response 0.

Response 0: [12]
Response 1: [7]
Response 2: [14]
Response 4: [15]

rank: [4, 2, 0, 1]"""

TEMPLATE_ECHO = (
    "The ranking should have the format: 'rank: [i, j ,k, l, m]'. If there are duplicate "
    "responses, the ranking may become: 'rank: [i, j, k, l]', 'rank: [i, j, k]' 'rank: [i, j]' "
    "or even 'rank: [i]'.\n"
)

# (reply, num_candidates, expected best-first list); N = 4 shown + the judge's own = 5.
# A ranking that leaves candidates out must name them as duplicates (parse_ranking), so the
# format cases below rank every candidate (num_candidates = the list's length).
GOOD = [
    ("rank: [2, 1, 0, 3, 4]", 5, [2, 1, 0, 3, 4]),
    # a negation word on the line before does not cancel a duplicate statement (found by fuzzing)
    ("NONE\nResponse 2 is a duplicate of Response 0.\nrank: [0, 1]", 3, [0, 1]),
    (PAPER_REPLY, 5, [4, 2, 0, 1]),
    ("Ranking: [3, 0, 4, 1, 2]", 5, [3, 0, 4, 1, 2]),
    ("RANKING: [1,0,2]", 3, [1, 0, 2]),
    ("Final ranking: [0, 4, 2, 1, 3]", 5, [0, 4, 2, 1, 3]),
    ("**rank:** [2, 0, 1, 4, 3]", 5, [2, 0, 1, 4, 3]),
    ("**rank: [2, 0, 1, 4, 3]**", 5, [2, 0, 1, 4, 3]),
    ("`rank: [4, 3, 2, 1, 0]`", 5, [4, 3, 2, 1, 0]),
    ("The final answer:\n\n**Ranking**: [1, 2, 0]", 3, [1, 2, 0]),
    ("rank: [\n  2,\n  0,\n  1,\n  4,\n  3\n]", 5, [2, 0, 1, 4, 3]),
    ("Ranking:\n[3, 1, 0, 2]", 4, [3, 1, 0, 2]),
    (
        "Ranking:\n1. Response 2\n2. Response 0\n3. Response 4\n4. Response 1\n5. Response 3",
        5,
        [2, 0, 4, 1, 3],
    ),
    ("Ranking:\n1. Response 2 (14/15)\n2. Response 0 - solid\n3. Response 1: weak", 3, [2, 0, 1]),
    ("### Final Ranking\n- Response 2\n- Response 1\n- Response 0\n\nThanks.", 3, [2, 1, 0]),
    ("Ranking:\n- 3\n- 1\n- 2\n- 0", 4, [3, 1, 2, 0]),
    ("Response 2 > Response 0 > Response 1", 3, [2, 0, 1]),
    ("Overall, 2 > 0 > 1 > 3 seems right.\n2 > 0 > 1 > 3", 4, [2, 0, 1, 3]),
    ("2 > 0 > 1 > 3", 4, [2, 0, 1, 3]),
    ("Order: 1 > 2 > 0.", 3, [1, 2, 0]),
    (
        "Ranking: Response 2 > Response 4 > Response 0 > Response 1 > Response 3",
        5,
        [2, 4, 0, 1, 3],
    ),
    ("Ranking: Response 3, Response 1, Response 0, Response 2", 4, [3, 1, 0, 2]),
    ("rank: [Response 3, Response 1, Response 4, Response 0, Response 2]", 5, [3, 1, 4, 0, 2]),
    ("rank: ['2', '0', '1']", 3, [2, 0, 1]),
    ("The ranking is [1, 0, 2, 4, 3].", 5, [1, 0, 2, 4, 3]),
    ('{"ranking": [2, 1, 0]}', 3, [2, 1, 0]),
    ("rank: '[0, 1, 2, 3, 4]'", 5, [0, 1, 2, 3, 4]),
    ("rank: [2 0 1]", 3, [2, 0, 1]),
    ("rank: 2, 0, 1.", 3, [2, 0, 1]),
    (TEMPLATE_ECHO + "Here it is.\nrank: [1, 4, 0, 2, 3]", 5, [1, 4, 0, 2, 3]),
    ("As asked, the format is 'rank: [i, j ,k, l, m]'.\nrank: [0, 1]", 2, [0, 1]),
    ("rank: [2, 1, 0]\nScores: 10, 12", 3, [2, 1, 0]),
    ("rank: [2, 1, 0] (scores 14, 12, 9)", 3, [2, 1, 0]),
    ("rank: 2, 1, 0\nScores: 10, 12", 3, [2, 1, 0]),
    ("I would rank the responses as follows.\nrank: [3, 2, 1, 0]", 4, [3, 2, 1, 0]),
    ("rank: [5, 2, 0, 1, 3, 4]", 6, [5, 2, 0, 1, 3, 4]),
    ("rank: [1, 0]", 2, [1, 0]),
    ("Response 0: 12\nResponse 1: 8\nrank: [0, 1, 2]", 3, [0, 1, 2]),
    ("Rank 1: Response 2\nRank 2: Response 1\nRank 3: Response 0 (score 9)", 3, [2, 1, 0]),
    ("Ranking (best to worst): [4, 1, 3, 0, 2]", 5, [4, 1, 3, 0, 2]),
    ("Ranking of the responses:\n1. Response 1 (14)\n2. Response 0 (12)", 2, [1, 0]),
    ("Ranking from best to worst: 2 > 0 > 1", 3, [2, 0, 1]),
    ("rank: [4, 2, 0, 1, 3]\nResponse 4 ranks first; I ranked 2 next.", 5, [4, 2, 0, 1, 3]),
    ("In this ranking, Response 2 wins.\nrank: [2, 1, 0]", 3, [2, 1, 0]),
    # the judge's own answer ranks things too; the final rank statement is the one
    ("###Response 4:\nRanking: 3, 1, 2\n\nrank: [4, 0, 1, 3, 2]", 5, [4, 0, 1, 3, 2]),
    # leaving candidates out: only those the reply names as duplicates of a kept one
    ("Responses 1, 2 and 3 are duplicates of Response 0.\nrank: [4, 0]", 5, [4, 0]),
    ("Response 3 is a duplicate of Response 1.\nrank: [4, 2, 0, 1]", 5, [4, 2, 0, 1]),
    ("Response 3 is a duplicate of Response 1.\nrank: [4, 2, 0, 3]", 5, [4, 2, 0, 3]),
    ("Responses 1 and 3 are identical.\nrank: [4, 2, 0, 1]", 5, [4, 2, 0, 1]),
    ("Duplicates: Response 1 and Response 3.\nrank: [4, 2, 0, 1]", 5, [4, 2, 0, 1]),
    ("Response 0, Response 1 and 3 are all the same.\nrank: [4, 1, 2]", 5, [4, 1, 2]),
    (
        "**Response 3** is an exact duplicate of **Response 1**.\nrank: [4, 1, 0, 2]",
        5,
        [4, 1, 0, 2],
    ),
    ("Response 3 duplicates Response 0.\n2 > 0 > 1 > 4", 5, [2, 0, 1, 4]),
    (
        "rank: [2, 1, 0, 4, 3]\nResponse 3 duplicates Response 1.\nAfter removing it: rank: [2, 1, 0, 4]",
        5,
        [2, 1, 0, 4],
    ),
    # a later partial recap never overrides the full ranking it abbreviates
    ("rank: [4, 2, 0, 1, 3]\nIn short, the ranking is 4 > 2.", 5, [4, 2, 0, 1, 3]),
    ("rank: [4, 2, 0, 1, 3]\nrank: [4]", 5, [4, 2, 0, 1, 3]),
    ("rank: [2, 1, 0, 4, 3]\nAfter removing the duplicate: rank: [2, 1, 0, 4]", 5, [2, 1, 0, 4, 3]),
    (PAPER_REPLY + "\nIn short: rank: [4, 2]", 5, [4, 2, 0, 1]),
]

BAD = [
    ("rank: [2, 1, 5]", 5),  # out of range
    ("rank: [2, 2, 1]", 5),  # repeat
    ("rank: []", 5),  # empty
    ("I think Response 2 is the best overall.", 5),  # no ranking
    ("", 5),
    ("rank: [i, j ,k, l, m]", 5),  # only the template placeholders
    (TEMPLATE_ECHO, 5),
    ("rank: [-1, 0, 2]", 5),  # negative
    ("rank: [two, zero, one]", 5),  # numbers as words
    ("Ranking: second, first, third", 5),
    ("rank: [1.5, 0, 2]", 3),
    ("rank: [2, 0 = 1, 3]", 4),  # tie, not a ranking
    ("1 < 0 < 2", 3),  # worst-first chain
    ("2 > 0, 1", 3),  # mixed separators
    ("rank: [1, 0]\nrank: [1, 7]", 5),  # the last rank is broken: never fall back to an earlier
    ("Response 2 should rank 1.", 5),  # a lone unbracketed number is prose
    ("Ranking: 2, 0, 1 (based on scores 14, 12)", 3),  # trailing numbers: refuse, don't guess
    ("Ranking:\n1. Response 2\n2. Response 0 and Response 1 tie", 3),
    ("Ranking:\n1. Response 1\n3. Response 0", 2),  # positions skip
    ("rank: [2, 1, 0, 3, 4]", 4),  # 4 out of range for 4 candidates
    ("rank: [0, 1]", 0),
    ("Ranking scores: 3, 2, 1, 0", 4),  # a label we do not know: these may be anything
    ("Ranking of the responses in decreasing order: 3, two, 1", 5),
    # fewer than 2 entries, always
    ("Only one distinct answer remains.\nrank: [3]", 5),
    ("Response 0 and Response 1 are duplicates.\nrank: [1]", 2),
    ("rank: [0]", 1),
    # candidates left out without being named duplicates of a kept one
    ("RANKING: [1,0,2]", 5),
    ("Duplicates removed.\nrank: [4, 0]", 5),
    ("2 > 0 > 1 > 3", 5),
    ("Response 1 and Response 3 are not duplicates.\nrank: [4, 2, 0, 1]", 5),
    ("There are no duplicates: Response 1 and Response 3 differ.\nrank: [4, 2, 0, 1]", 5),
    ("Response 1 and Response 3 are duplicates.\nrank: [4, 2, 0]", 5),  # neither kept
    ("Response 3 is similar to Response 1.\nrank: [4, 2, 0, 1]", 5),  # similar is not a duplicate
    ("Response 1 and Response 3 are the same length.\nrank: [4, 2, 0, 1]", 5),
    ("Response 3 is a duplicate of Response 1 and Response 2 is weak.\nrank: [4, 0, 1, 3]", 5),
    # a later partial statement that is no recap of the full ranking: disagreement
    ("rank: [4, 2, 0, 1, 3]\nIn short: rank: [4, 0]", 5),
    ("rank: [4, 2, 0, 1, 3]\nrank: [4, 2, 1]\nIn short, the ranking is 4 > 2.", 5),
    ("rank: [4, 2]\nrank: [4]", 5),  # a recap of nothing justified
]


@pytest.mark.parametrize(("reply", "num", "expected"), GOOD)
def test_parse_ranking_reads_judge_variants(reply, num, expected):
    assert parse_ranking(reply, num) == expected


@pytest.mark.parametrize(("reply", "num"), BAD)
def test_parse_ranking_refuses_broken_replies(reply, num):
    with pytest.raises(ValueError):
        parse_ranking(reply, num)


def test_table_is_broad():
    assert len(GOOD) + len(BAD) >= 40


_NO_RANK = st.text().filter(lambda s: "rank" not in s.lower() and "dup" not in s.lower())


@settings(max_examples=300, deadline=None)
@given(data=st.data(), num=st.integers(1, 9), prefix=_NO_RANK, suffix=_NO_RANK, named=st.booleans())
def test_parse_returns_exactly_the_rendered_ranking(data, num, prefix, suffix, named):
    items = data.draw(st.permutations(range(num)))
    ranking = items[: data.draw(st.integers(1, num))]
    line = data.draw(st.sampled_from(["rank: [{}]", "Ranking: [{}]", "**rank:** [{}]"]))
    left_out = [i for i in range(num) if i not in ranking]
    dups = "".join(f"Response {i} is a duplicate of Response {ranking[0]}.\n" for i in left_out)
    text = f"{prefix}\n{dups if named else ''}{line.format(', '.join(map(str, ranking)))}\n{suffix}"
    if len(ranking) >= 2 and (named or not left_out):
        assert parse_ranking(text, num) == ranking
    else:  # one entry, or candidates left out silently
        with pytest.raises(ValueError):
            parse_ranking(text, num)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), num=st.integers(2, 9), filler=_NO_RANK)
def test_a_partial_recap_never_replaces_the_full_ranking(data, num, filler):
    full = data.draw(st.permutations(range(num)))
    recap = data.draw(
        st.lists(st.sampled_from(range(num)), min_size=1, max_size=num - 1, unique=True)
    )
    form = data.draw(st.sampled_from(["rank: [{}]", "In short, the ranking is {}.", "Ranking: {}"]))
    sep = ", " if form.startswith("rank") else " > "
    text = (
        f"rank: [{', '.join(map(str, full))}]\n{filler}\n{form.format(sep.join(map(str, recap)))}"
    )
    try:
        out = parse_ranking(text, num)
    except ValueError:
        assert full[: len(recap)] != recap  # only a disagreeing statement is refused
        return
    assert out == full  # the recap never wins, and agrees with it
    assert full[: len(recap)] == recap or len(recap) < 2


_TOKENS = st.sampled_from(
    [
        "rank",
        "Ranking",
        ":",
        " ",
        "\n",
        "[",
        "]",
        ",",
        ">",
        "Response ",
        "1. ",
        "- ",
        "**",
        "0",
        "1",
        "2",
        "3",
        "7",
        "-1",
        "'",
        "is ",
        "i",
        ".",
        " are duplicates",
        " is a duplicate of ",
        " and ",
        "not",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    text=st.one_of(st.text(), st.lists(_TOKENS, max_size=30).map("".join)), num=st.integers(1, 6)
)
def test_parse_never_returns_a_wrong_list(text, num):
    try:
        out = parse_ranking(text, num)
    except ValueError:
        return
    assert len(out) >= 2 and len(set(out)) == len(out) and all(0 <= i < num for i in out)
    assert len(out) == num or "duplicate" in text.lower()  # left out only what was named


def test_parse_json_ranking_validates():
    reply = {
        "instruction_type": "close-ended",
        "reference_answer": "Paris.",
        "scores": [{"response": 0, "score": 12}],
        "ranking": [4, 0, 2],
    }
    assert parse_json_ranking(json.dumps(reply), 5) == [4, 0, 2]
    assert parse_json_ranking("```json\n" + json.dumps(reply) + "\n```", 5) == [4, 0, 2]
    assert parse_json_ranking("Sure: " + json.dumps(reply), 5) == [4, 0, 2]
    for bad in [
        '{"ranking": [0, 0]}',
        '{"ranking": [9]}',
        '{"ranking": [3]}',  # fewer than 2 entries
        '{"ranking": []}',
        '{"ranking": [true, 0]}',
        '{"ranking": ["1"]}',
        "[1, 0]",
        "no json",
    ]:
        with pytest.raises(ValueError):
            parse_json_ranking(bad, 5)
    # json_v1 asks to keep one of each group of duplicates; there is nothing to check the
    # omissions against, so a shorter list of >= 2 entries is taken as given
    assert parse_json_ranking('{"ranking": [2, 0]}', 5) == [2, 0]
    got = parse_judge_reply(json.dumps(reply), 4, template="json_v1")
    assert got.ranking == [4, 0, 2] and got.reference_answer == "Paris."
    assert got.reference_status == "found"
    empty = parse_judge_reply(json.dumps({**reply, "reference_answer": " "}), 4, template="json_v1")
    assert empty.reference_answer is None and empty.reference_status == "absent"


def test_extract_reference_answer():
    assert extract_reference_answer(PAPER_REPLY, 4) == "The capital of France is Paris."
    multi = "###Response 4: Step one.\n\nStep two.\n\n### Ratings\nResponse 0: 3"
    assert extract_reference_answer(multi, 4) == "Step one.\n\nStep two."
    own_line = "**Response 4 (reference):**\nA haiku here\nsecond line\nFourth, scores.\nrank: [4]"
    assert extract_reference_answer(own_line, 4) == "A haiku here\nsecond line"
    # quoted mentions and rating lines are not the block
    assert extract_reference_answer("generate one '###Response 4'.\nResponse 4: 14", 4) is None
    assert extract_reference_answer("rank: [0, 1]", 4) is None
    assert extract_reference_answer("###Response 4:\n\n###Response 5:\nx", 4) is None
    assert parse_judge_reply(PAPER_REPLY, 4).reference_answer == "The capital of France is Paris."


# A how-to answer full of what the old parser took for the judge's next step: numbered steps,
# markdown headings, "First,", "Step 1:", and the words rank, duplicate and Response.
HOW_TO = """To bake a cake:

## Ingredients
- 2 cups **flour**
- 1 cup sugar

## Steps
First, preheat the oven to 180 C.
Step 1: Mix the dry ingredients.
Step 2: Beat in the eggs.
1. Pour the batter into a pan.
2. Bake for 30 minutes.

# Tips
Rank your pans by size; a duplicate pan saves time.
Response time of cheap ovens is slow, so check early.
Finally, let it cool."""

SCORES = "Response 0: 9\nResponse 1: 11\nResponse 2: 7\nResponse 3: 8\nResponse 4: 15"

# Replies to the paper prompt laid out as GPT-4-class judges lay them out.
LAYOUTS = {
    "paper_steps": (
        "The instruction is open-ended.\n\n###Response 4:\n{a}\n\n"
        "Third, Response 1 and Response 3 are duplicates; we keep Response 1.\n\n"
        "Fourth, the scores:\n" + SCORES + "\n\nrank: [4, 1, 0, 2]"
    ),
    "second_prefix": (
        "First, the instruction is open-ended.\n\nSecond, ###Response 4: {a}\n\n"
        "Third, there are no duplicate responses.\n\n" + SCORES + "\n\nLast, rank: [4, 1, 0, 3, 2]"
    ),
    "step_headings": (
        "**Step 1:** open-ended.\n\n**Step 2:**\n### Response 4\n{a}\n\n"
        "**Step 3:** No duplicates.\n\n---\n\n**Step 4:**\n"
        + "\n".join(f"- Response {k}: [4+4+4=12]" for k in range(5))
        + "\n\n**rank:** [4, 0, 1, 2, 3]"
    ),
    "ratings_heading": (
        "Open-ended.\n\n###Response 4:\n{a}\n\nAll responses are distinct.\n\n"
        "### Ratings\n" + SCORES + "\n\nrank: [4, 1, 3, 0, 2]"
    ),
    "ratings_with_prose": (
        "###Response 4:\n{a}\n\nDuplicates: Response 1 and Response 3 are identical, so I keep "
        "Response 1.\n\nScores:\n"
        + "\n".join(f"Response {k}: Relevance 5, Details 4, Accuracy 4 = 13" for k in range(5))
        + "\n\nrank: [4, 0, 1, 2]"
    ),
    "answer_last_before_rank": (
        "The instruction is open-ended. There are no duplicate responses.\n\n"
        + SCORES
        + "\n\n###Response 4:\n{a}\n\nrank: [4, 1, 0, 3, 2]"
    ),
    "answer_then_final_ranking": (
        "Open-ended; no duplicates.\n" + SCORES + "\n###Response 4:\n{a}\n"
        "The final ranking is [4, 1, 0, 3, 2]."
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reference_answer_is_whole_in_every_layout(layout):
    reply = LAYOUTS[layout].replace("{a}", HOW_TO)
    assert extract_reference_answer(reply, 4) == HOW_TO  # emphasis kept, nothing cut
    assert find_reference_answer(reply, 4) == (HOW_TO, "found")


@pytest.mark.parametrize(
    "answer",
    [
        "To bake a cake:\nFirst, preheat the oven.\nSecond, mix the batter.\nThird, bake it.",
        "Step 1: Whisk.\nStep 2: Fold.\nStep 3: Bake.",
        "1. Preheat the oven.\n2. Mix.\n3. Bake.",
        "## Ingredients\n- flour\n\n## Method\n# Bake it\nBake for 30 minutes.",
        "Response: Thank you for your email, we will reply soon.",
        "Rank the candidates by experience, then remove duplicate entries.\nDone.",
        "The HTTP Response carries a status line.\nRanking: highest priority first.",
        "Scores vary from oven to oven.\nRatings are subjective.",
    ],
)
def test_reference_answer_keeps_words_the_judge_also_uses(answer):
    reply = LAYOUTS["paper_steps"].replace("{a}", answer)
    assert extract_reference_answer(reply, 4) == answer
    last = LAYOUTS["answer_last_before_rank"].replace("{a}", answer)
    assert extract_reference_answer(last, 4) == answer


def test_the_old_stub_is_never_returned():
    # the old parser stopped at "First," / "1." / "#" and returned the stub "To bake a cake:"
    reply = (
        "Open-ended.\n\n###Response 4:\nTo bake a cake:\nFirst, preheat the oven.\n"
        "# Method\n1. Mix.\n\nResponse 1 and Response 3 are duplicates.\n\n"
        + SCORES
        + "\nrank: [4, 0, 1, 2]"
    )
    answer = "To bake a cake:\nFirst, preheat the oven.\n# Method\n1. Mix."
    assert extract_reference_answer(reply, 4) == answer
    assert parse_judge_reply(reply, 4).reference_answer == answer


UNCERTAIN = {
    # cut off: no section of the reply follows the answer
    "no_end": "Open-ended.\n\n###Response 4:\nTo bake a cake:\n1. Preheat the oven.",
    "rank_before_answer": "rank: [4, 0, 1, 2, 3]\n\n###Response 4:\nBake it.",
    # judge notes inside the block, with plain prose after them
    "notes_inside": (
        "###Response 4:\nBake it.\n\nDuplicates: Response 1 and Response 3.\n\n"
        "Now I will score them carefully.\n\n" + SCORES + "\nrank: [4, 0, 1, 2]"
    ),
    # the last line may be the answer's or the judge's next step
    "step_like_tail": (
        "###Response 4:\nBake it.\n\nThird, I compared them all.\n\n"
        + SCORES
        + "\nrank: [4, 0, 1, 2, 3]"
    ),
    "duplicate_tail": (
        "###Response 4:\nClean the sheet.\nFinally, remove duplicates.\n\n"
        + SCORES
        + "\nrank: [4, 0, 1, 2, 3]"
    ),
    # per-response sections before the judge's own: the layout is unknown
    "other_headers_first": (
        "### Response 0\nGood.\n### Response 4\nBake it.\n\n" + SCORES + "\nrank: [4, 0, 1, 2, 3]"
    ),
    # a rank-like line followed by the ratings may belong to the answer
    "rank_line_inside": (
        "###Response 4:\nSorted:\nRanking: 1, 2, 3\nThat is all.\n\n"
        + SCORES
        + "\nrank: [4, 0, 1, 2, 3]"
    ),
}


@pytest.mark.parametrize("name", sorted(UNCERTAIN))
def test_reference_answer_is_dropped_when_its_end_is_uncertain(name):
    assert find_reference_answer(UNCERTAIN[name], 4) == (None, "uncertain")
    assert extract_reference_answer(UNCERTAIN[name], 4) is None


def test_reference_status_reaches_the_reply():
    assert parse_judge_reply(PAPER_REPLY, 4).reference_status == "found"
    got = parse_judge_reply(UNCERTAIN["notes_inside"], 4)
    assert got.ranking == [4, 0, 1, 2] and got.reference_answer is None
    assert got.reference_status == "uncertain"
    no_answer = parse_judge_reply("Response 3 duplicates Response 1.\nrank: [2, 0, 1, 4]", 4)
    assert no_answer.reference_status == "absent"
    assert find_reference_answer("###Response 4:\n\nResponse 0: 9\nrank: [0, 1]", 4) == (
        None,
        "absent",
    )


_ANSWER_LINES = st.sampled_from(
    [
        "To bake a cake:",
        "First, preheat the oven.",
        "Step 1: Mix.",
        "1. Pour.",
        "2) Bake.",
        "- flour",
        "* sugar",
        "## Ingredients",
        "# Tips",
        "**Note:** be careful.",
        "Rank the pans by size.",
        "Ranking: most ripe first.",
        "Never duplicate the sugar.",
        "Response time matters.",
        "Response: thanks for asking.",
        "Third, bake it.",
        "Finally, serve.",
        "Scores differ.",
        "",
        "---",
    ]
)
_JUDGE_LINES = st.sampled_from(
    [
        "Response 1 and Response 3 are duplicates.",
        "There are no duplicate responses.",
        "Duplicates: none.",
        "Third, comparing Response 4 with the others.",
        "### Scores",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    lines=st.lists(_ANSWER_LINES, min_size=1, max_size=12),
    layout=st.sampled_from(sorted(LAYOUTS)),
    note=st.none() | st.tuples(_JUDGE_LINES, st.integers(0, 11)),
)
def test_reference_answer_is_whole_or_none_never_a_part(lines, layout, note):
    while lines and lines[-1] in ("", "---"):  # a trailing rule is the judge's separator
        lines.pop()
    if note is not None:  # judge notes inside the answer (not at its end): the block is unsure
        lines.insert(min(note[1], max(len(lines) - 1, 0)), note[0])
    answer = "\n".join(lines)
    out = extract_reference_answer(LAYOUTS[layout].replace("{a}", answer), 4)
    assert out is None or out == answer.strip()
    if note is not None and lines[-1] != note[0]:
        assert out is None


def test_render_paper_v1_for_four_responses_is_the_reference_text_verbatim():
    messages = render_judge_messages("<PROMPT>", [f"<R{k}>" for k in range(4)])
    assert messages == [
        {"role": "system", "content": "You are a professional and experienced data annotator."},
        {"role": "user", "content": PAPER_N4},
    ]


def test_render_generalises_numbers_for_other_n():
    two = render_judge_messages("P", ["a", "b"])[1]["content"]
    assert two.startswith("P\n\n###Response 0:\na\n\n###Response 1:\nb\n\n\nWe would like")
    assert "rate Response 0/1 in" in two and "'###Response 2'" in two
    assert "compare Response 2 with Response 0/1/2 and" in two
    assert "format: 'rank: [i, j ,k]'." in two
    assert "may become: 'rank: [i, j]' or even 'rank: [i]'." in two
    six = render_judge_messages("P", list("abcdef"))[1]["content"]
    assert "rate Response 0/1/2/3/4/5 in" in six and "'###Response 6'" in six
    assert "compare Response 6 with Response 0/1/2/3/4/5/6 and" in six
    assert "'rank: [i, j ,k, l, m, n, o]'" in six
    assert "'rank: [i, j, k, l, m, n]', 'rank: [i, j, k, l, m]', 'rank: [i, j, k, l]', " in six
    assert "'rank: [i, j, k]' 'rank: [i, j]' or even 'rank: [i]'." in six
    with pytest.raises(ValueError):
        render_judge_messages("P", [])


def test_json_template_has_a_strict_schema_and_renders():
    assert set(JUDGE_TEMPLATES) == {"paper_v1", "json_v1"}
    tpl = load_judge_template("json_v1")
    fmt = tpl.response_format
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["ranking"]["items"] == {"type": "integer"}
    user = render_judge_messages("P", ["a", "b", "c"], template="json_v1")[1]["content"]
    assert "Response 3" in user and '"ranking"' in user and "0/1/2/3" in user
    assert load_judge_template("paper_v1").response_format is None
    with pytest.raises(ValueError):
        load_judge_template("nope")


def test_judge_order_is_deterministic_and_maps_back():
    assert judge_order(4, shuffle=False, seed=0) == [0, 1, 2, 3]
    assert judge_order(4, shuffle=False, seed=0, fold=1) == [1, 2, 3, 0]
    a = judge_order(6, shuffle=True, seed=7, fold=0, key="id-1")
    assert a == judge_order(6, shuffle=True, seed=7, fold=0, key="id-1")
    assert sorted(a) == list(range(6))
    orders = {tuple(judge_order(6, shuffle=True, seed=7, fold=0, key=f"id-{i}")) for i in range(20)}
    assert len(orders) > 10  # different instructions, different orders
    assert a != judge_order(6, shuffle=True, seed=7, fold=1, key="id-1")
    # shown [answers[i] for i in order]; the judge prefers the answer "c" and then its own
    answers = ["a", "b", "c", "d"]
    order = judge_order(4, shuffle=True, seed=3, fold=0, key="x")
    shown = [answers[i] for i in order]
    ranking = map_to_original([shown.index("c"), 4, shown.index("a")], order)
    assert ranking == [2, REFERENCE, 0]
    with pytest.raises(ValueError):
        map_to_original([5], order)


def test_borda_hand_checked():
    # 3 items; points = 3 - position; fold 2 dropped item 2 as a duplicate
    folds = [[0, 1, 2], [1, 0, 2], [1, 0]]
    assert borda_points(folds, 3) == {0: 3 + 2 + 2, 1: 2 + 3 + 3, 2: 1 + 1}
    assert borda(folds, 3) == [1, 0, 2]
    # tie on points (0: 3+2, 1: 2+3); same best position; lower index wins
    assert borda([[0, 1], [1, 0]], 2) == [0, 1]
    # all tie at 4 points; best positions 1: 0, 2: 0, 0: 1 -> then index
    assert borda([[1, 0, 2], [2, 0, 1]], 3) == [1, 2, 0]
    assert borda([[1, 0], [0, 1], [REFERENCE, 1, 0]], 3) == [1, 0, REFERENCE]
    assert borda([[REFERENCE, 0], [0, REFERENCE]], 2) == [0, REFERENCE]
    order, points = aggregate_folds([[2, 0], [0, 2]], 3)
    assert order == [0, 2] and points == [5, 5]
    assert aggregate_folds([[2, REFERENCE, 0]], 4) == ([2, REFERENCE, 0], None)


def test_pairwise_agreement():
    assert pairwise_agreement([[0, 1, 2], [0, 1, 2]]) == 1.0
    assert pairwise_agreement([[0, 1, 2], [2, 1, 0]]) == 0.0
    assert pairwise_agreement([[0, 1, 2], [1, 0, 2]]) == pytest.approx(2 / 3)
    assert pairwise_agreement([[0, 1]]) is None


RECORD = {
    "id": "r1",
    "instruction": "Capital of France?",
    "input": "",
    "prompt": "P",
    "generator": '{"engine": "hf"}',
    "source": "alpaca",
}


def test_build_record_drops_duplicates_and_inserts_the_judge_reference():
    cands = ["Paris.", "London.", "Paris is the capital.", "Paris."]
    out = build_contextual_record(
        RECORD,
        cands,
        [2, REFERENCE, 0, 1],
        reference_answer="The capital is Paris.",
        include_judge_reference=True,
        judge_raw=["raw reply"],
        judge="gpt-4",
    )
    assert out["responses"] == [
        "Paris is the capital.",
        "The capital is Paris.",
        "Paris.",
        "London.",
    ]
    assert out["origins"] == ["sample", "judge_reference", "sample", "sample"]
    assert out["ranking"] == "contextual" and out["scores"] is None
    assert json.loads(out["judge_raw"]) == ["raw reply"] and out["judge"] == "gpt-4"
    assert out["id"] == "r1" and out["prompt"] == "P" and out["generator"] == '{"engine": "hf"}'
    without = build_contextual_record(
        RECORD,
        cands,
        [2, REFERENCE, 0, 1],
        reference_answer="The capital is Paris.",
        include_judge_reference=False,
        judge_raw=["raw"],
        judge="gpt-4",
        scores=[9, 8, 7, 6],
    )
    assert without["responses"] == ["Paris is the capital.", "Paris.", "London."]
    assert without["scores"] == [9, 7, 6]


def _build(cands, ranking, ref=None, include=True):
    return build_contextual_record(
        RECORD, cands, ranking, reference_answer=ref, include_judge_reference=include,
        judge_raw=["r"], judge="j",
    )  # fmt: skip


def test_build_record_excluded_when_fewer_than_two_survive():
    assert _build(["a", "b"], [1, 0])["responses"] == ["b", "a"]
    assert _build(["a", "b"], [1]) is None  # the judge dropped one as a duplicate
    assert _build(["a", "b"], [1, REFERENCE], ref="x", include=False) is None
    assert _build(["a", "b"], [REFERENCE, 0]) is None  # reference missing: skipped, not invented
    assert _build(["a", " a "], [0, 1]) is None  # identical texts after stripping count once
    with pytest.raises(ValueError):
        _build(["a", "b"], [0, 5])


def test_json_schema_names_only_the_indices_shown():
    from itertools import permutations

    from tuna_ray.ranking.contextual import judge_response_format

    assert judge_response_format("paper_v1", 4) is None
    api = judge_response_format("json_v1", 3)["json_schema"]["schema"]["properties"]
    assert api["ranking"] == {"type": "array", "items": {"type": "integer", "enum": [0, 1, 2, 3]}}
    assert api["scores"]["items"]["properties"]["response"]["enum"] == [0, 1, 2, 3]
    grammar = judge_response_format("json_v1", 3, grammar=True)["json_schema"]["schema"]
    orders = grammar["properties"]["ranking"]["enum"]
    assert sorted(map(tuple, orders)) == sorted(permutations(range(4)))  # each index once
    assert all(len(parse_json_ranking(json.dumps({"ranking": o}), 4)) == 4 for o in orders)
    assert grammar["properties"]["reference_answer"]["maxLength"] == 4000
    many = judge_response_format("json_v1", 8, grammar=True)["json_schema"]["schema"]
    assert many["properties"]["ranking"]["maxItems"] == 9  # 9! orders: bounded list instead
    # the template's own schema is left as it was
    plain = load_judge_template("json_v1").response_format["json_schema"]["schema"]
    assert plain["properties"]["ranking"] == {"type": "array", "items": {"type": "integer"}}

"""GSM8K prompts, answer extraction and scoring as lm-eval-harness's `gsm8k` task (version 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge import gsm8k
from loraforge.errors import PermanentError
from loraforge.gsm8k import Problem, Shot, ShotSampler

# lm_eval/tasks/gsm8k/gsm8k.yaml (metadata version 3.0), copied as the YAML's strings read.
LM_EVAL_STRICT = "#### (\\-?[0-9\\.\\,]+)"
LM_EVAL_FLEXIBLE = "(-?[$0-9.,]{2,})|(-?[0-9]+)"
LM_EVAL_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
LM_EVAL_UNTIL_PLAIN = ["Question:"]  # plus the end tokens </s> and <|im_end|>


def test_patterns_are_lm_evals_documented_regexes() -> None:
    assert gsm8k.STRICT_PATTERN == LM_EVAL_STRICT
    assert gsm8k.FLEXIBLE_PATTERN == LM_EVAL_FLEXIBLE
    assert list(gsm8k.IGNORE_PATTERNS) == LM_EVAL_IGNORE
    assert list(gsm8k.STOP_STRINGS) == LM_EVAL_UNTIL_PLAIN


# (generated text after the stop cut, strict-match, flexible-extract); None is lm-eval's [invalid]
EXTRACTIONS = [
    ("The answer is 42.\n#### 42", "42", "42"),
    ("#### 1,234", "1,234", "1,234"),
    ("#### -7", "-7", "-7"),
    ("#### 3.5", "3.5", "3.5"),
    ("#### $18", None, "$18"),
    ("#### 5\n#### 7", "5", "7"),
    ("no answer here", None, None),
    ("", None, None),
    ("#### 42 apples, then 3 more", "42", "3"),
    ("#### 10.\n", "10.", "10."),
    ("It costs $1,000.00 total.\n#### 1000", "1000", "1000"),
    ("####42", None, "42"),
    ("#### -3.25", "-3.25", "-3.25"),
    ("So 5 + 7 = 12.", None, "12."),
    ("#### 1,000,000", "1,000,000", "1,000,000"),
    ("#### 0", "0", "0"),
    ("The total is 0.5 dollars", None, "0.5"),
    ("#### .5", ".5", ".5"),
    ("#### 5 - 3", "5", "3"),
    ("There are 3 dogs and 4 cats. #### 7", "7", "7"),
    ("#### 7 dogs. Then 8 cats.", "7", "8"),
    ("The result is -15 degrees", None, "-15"),
    ("1,2,3", None, "1,2,3"),
    ("Total: 2.5.\n#### 2.5", "2.5", "2.5"),
    ("#### $5", None, "$5"),
    ("#### 12.\n\n", "12.", "12."),
    ("#### 1,5", "1,5", "1,5"),
    ("We get 4 + 4 = 8 (not 9).", None, "9"),
    ("#### 8\nThe answer is 8.", "8", "8."),
    ("#### 123abc", "123", "123"),
    ("Price: $.50", None, "$.50"),
    ("#### --5", None, "-5"),
    ("#### 3 #### 4", "3", "4"),
    ("The answer is\n####\n12", None, "12"),
    ("#### 1.000", "1.000", "1.000"),
    ("3.14159", None, "3.14159"),
    ("   #### 42   ", "42", "42"),
    ("Ana has 5 apples.\n#### five", None, "5"),
    ("Step 1: 2*3=6\nStep 2: 6+1=7\n#### 7", "7", "7"),
    ("#### 2,500.50", "2,500.50", "2,500.50"),
    ("x = -0.75", None, "-0.75"),
    ("#### -1,200", "-1,200", "-1,200"),
    ("10%", None, "10"),
    ("Tom had 12 apples and bought 34 more, so Tom bought 34.\n#### 34", "34", "34"),
    ("She pays 3 x $4 = $12 in total.", None, "$12"),
]


@pytest.mark.parametrize(("text", "strict", "flexible"), EXTRACTIONS)
def test_extraction_matches_lm_eval(text: str, strict: str | None, flexible: str | None) -> None:
    assert gsm8k.extract_strict(text) == strict
    assert gsm8k.extract_flexible(text) == flexible


def test_there_are_at_least_40_hand_written_cases() -> None:
    assert len(EXTRACTIONS) >= 40


@pytest.mark.parametrize(
    ("extracted", "target", "correct"),
    [
        ("$1,000.", "1000", True),  # comma, dollar and trailing dot are ignored
        ("1,234", "1234", True),
        ("5.", "5", True),
        ("$18", "18", True),
        ("-7", "-7", True),
        ("7", "-7", False),
        ("72.0", "72", False),  # lm-eval compares strings, not values
        ("18.00", "18", False),
        (None, "5", False),
    ],
)
def test_correctness_uses_lm_evals_normalisation(
    extracted: str | None, target: str, correct: bool
) -> None:
    assert gsm8k.is_correct(extracted, target) is correct


@pytest.mark.parametrize(
    ("generated", "strict", "flexible"),
    [
        # the model goes on to ask and answer a new question: only the first answer counts
        (" 5 + 7 = 12.\n#### 12\n\nQuestion: Tom has 3 apples.\nAnswer: #### 3", "12", "12"),
        (" #### 8\nQuestion: 9 + 9?\nAnswer: #### 18\n\nQuestion: 1 + 1?", "8", "8"),
        ("Question: what is 2 + 2?\nAnswer: #### 4", None, None),
        (" no stop string here #### 6", "6", "6"),
    ],
)
def test_outputs_are_cut_at_the_first_stop_string(
    generated: str, strict: str | None, flexible: str | None
) -> None:
    text = gsm8k.cut_at_stop(generated)
    assert "Question:" not in text
    assert (gsm8k.extract_strict(text), gsm8k.extract_flexible(text)) == (strict, flexible)


@pytest.mark.parametrize(
    ("answer", "target"),
    [
        ("She has 3 + 4 = 7.\n#### 7", "7"),
        ("#### 1,000", "1000"),
        ("First #### 3 then\n#### -12", "-12"),  # the reference is after the last ####
        ("#### 2.5", "2.5"),
        ("#### $40.", "40"),
        ("The answer is 7", None),
        ("#### seven", None),
        ("####7", None),
    ],
)
def test_reference_is_the_number_after_the_last_marker(answer: str, target: str | None) -> None:
    assert gsm8k.reference_number(answer) == target


# --- prompts ------------------------------------------------------------------------------------


def _problem(i: int, question: str = "") -> Problem:
    return Problem(i, question or f"q{i}?", f"a {i}\n#### {i}", str(i), f"test.jsonl:{i + 1}")


def test_prompt_is_lm_evals_layout_and_the_train_jobs() -> None:
    from loraforge.tiny import qa_text

    shots = [Shot("How many? 1", "One.\n#### 1"), Shot("How many? 2", "Two.\n#### 2")]
    problem = _problem(0, "How many? 3")
    expected = (
        "Question: How many? 1\nAnswer: One.\n#### 1\n\n"
        "Question: How many? 2\nAnswer: Two.\n#### 2\n\n"
        "Question: How many? 3\nAnswer:"
    )
    assert gsm8k.plain_prompt(problem, shots) == expected
    assert gsm8k.shot_text(shots[0]) == qa_text(
        {"question": "How many? 1", "answer": "One.\n#### 1"}
    )
    assert gsm8k.plain_prompt(problem, []) == "Question: How many? 3\nAnswer:"


def test_chat_prompt_puts_each_example_in_its_own_turns(tiny_kit) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_kit.model_dir)
    shots = [Shot("q1", "a1")]
    ids = gsm8k.encode_prompt(_problem(0, "q2"), shots, tokenizer, chat=True)
    text = tokenizer.decode(ids)
    assert text == (
        "<|im_start|>user\nQuestion: q1\nAnswer:<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nQuestion: q2\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    )


def test_shots_are_seeded_per_problem_and_not_always_the_first_k() -> None:
    pool = [Shot(f"q{i}?", f"#### {i}") for i in range(50)]
    sampler = ShotSampler(pool, 5, seed=1234)
    draws = [sampler.draw(_problem(i, f"other {i}")) for i in range(20)]
    assert all(len(d) == 5 == len(set(d)) for d in draws)
    assert len({tuple(d) for d in draws}) == 20  # a fresh draw per problem
    assert not all(d == [0, 1, 2, 3, 4] for d in draws)
    again = ShotSampler(pool, 5, seed=1234)
    assert [again.draw(_problem(i, f"other {i}")) for i in reversed(range(20))] == draws[::-1]
    assert ShotSampler(pool, 5, seed=7).draw(_problem(0, "other 0")) != draws[0]


def test_a_problem_is_never_its_own_example() -> None:
    pool = [Shot(f"q{i}?", f"#### {i}") for i in range(8)]  # the eval data as its own pool
    sampler = ShotSampler(pool, 7, seed=0)
    for i in range(8):
        drawn = sampler.draw(_problem(i, f"q{i}?"))
        assert i not in drawn and len(drawn) == 7
    with pytest.raises(PermanentError, match=r"LORAFORGE_NUM_FEWSHOT=8: .* only 7 examples"):
        ShotSampler(pool, 8, seed=0).draw(_problem(3, "q3?"))


# --- data ---------------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_subset_is_seeded_and_keeps_file_order(tmp_path: Path) -> None:
    uri = _write(
        tmp_path / "t.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(30)]
    )
    picked = gsm8k.load_problems(uri, limit=10, seed=3)
    ids = [p.index for p in picked]
    assert len(ids) == 10 and ids == sorted(ids) and ids != list(range(10))
    assert [p.index for p in gsm8k.load_problems(uri, limit=10, seed=3)] == ids
    assert [p.index for p in gsm8k.load_problems(uri, limit=10, seed=4)] != ids
    assert len(gsm8k.load_problems(uri, limit=99, seed=3)) == 30
    assert picked[0].target == str(ids[0]) and picked[0].where == f"{uri}:{ids[0] + 1}"


def test_bad_records_are_named_by_file_and_line(tmp_path: Path) -> None:
    rows = [
        {"question": "q0", "answer": "#### 1"},
        {"question": "q1", "solution": "#### 2"},
        {"question": "q2", "answer": "two"},
        {"question": "q3", "answer": "#### 3"},
    ]
    uri = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PermanentError) as err:
        gsm8k.load_problems(uri, limit=None, seed=0)
    message = str(err.value)
    assert f"{uri}:2: no string answer" in message
    assert f"{uri}:3: the answer has no final `#### N` number" in message
    assert "\n" not in message


def test_default_fewshot_source_is_the_train_split() -> None:
    assert (
        gsm8k.default_fewshot_uri("hf://openai/gsm8k:main/test") == "hf://openai/gsm8k:main/train"
    )
    assert gsm8k.default_fewshot_uri("data/test.jsonl") == "data/test.jsonl"

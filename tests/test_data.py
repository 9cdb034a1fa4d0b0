import json
import re

import pytest

from rlpost.config import ArithmeticConfig, DataConfig
from rlpost.data import DataError, arithmetic_splits, load_problems, load_prompt_sets


def test_arithmetic_is_seeded_disjoint_and_correct():
    cfg = ArithmeticConfig(digits=2, num_operations=2, operations=["+", "-", "*"], train_size=300, test_size=50)
    train, test = arithmetic_splits(cfg, seed=3)
    again, _ = arithmetic_splits(cfg, seed=3)
    assert (len(train), len(test)) == (300, 50)
    assert [p.question for p in train] == [p.question for p in again]
    assert not {p.question for p in train} & {p.question for p in test}
    import sympy  # checked by another evaluator than the generator's own `eval`
    for p in train:
        expr = p.question.removeprefix("What is ").removesuffix("?")
        assert sympy.sympify(expr) == sympy.Integer(p.answer), p.question


def test_small_problem_space_splits_in_proportion():
    train, test = arithmetic_splits(ArithmeticConfig(digits=1, operations=["+"], train_size=900, test_size=100), 0)
    # 9 x 9 = 81 distinct problems; the test split keeps its share 100 / 1000: round(8.1) = 8
    assert (len(train), len(test)) == (73, 8)


def _solve_story(question: str) -> tuple[int, int]:
    """(answer, number of operations) of a word problem, read sentence by sentence: the generator's
    templates as a reader would take them, independent of the expression the generator evaluates."""
    story, asked = question.rsplit(" How many ", 1)
    assert re.fullmatch(r"\w+ does \w+ have now\?", asked), question
    value, operations = None, 0
    for sentence in (s.strip() for s in re.findall(r"[^.]+\.", story)):
        if m := re.fullmatch(r"\w+ (?:has|buys) (\d+) (?:boxes|bags) (?:with|of) (\d+) \w+ (?:in )?each\.", sentence):
            value, operations = int(m[1]) * int(m[2]), operations + 1
        elif m := re.fullmatch(r"\w+ has (\d+) \w+ and gives away (\d+) of them\.", sentence):
            value, operations = int(m[1]) - int(m[2]), operations + 1
        elif m := re.fullmatch(r"\w+ has (\d+) \w+\.", sentence):
            value = int(m[1])
        elif m := re.fullmatch(r"(?:He|She) gets (\d+) more(?: \w+)?\.", sentence):
            value, operations = value + int(m[1]), operations + 1
        elif m := re.fullmatch(r"(?:He|She) gives away (\d+)\.", sentence):
            value, operations = value - int(m[1]), operations + 1
        else:
            raise AssertionError(f"unreadable sentence {sentence!r} in {question!r}")
        assert value >= 0, question  # a story never gives away more than there is
    return value, operations


@pytest.mark.parametrize("digits", [1, 2])
def test_word_problems_and_difficulty(digits):
    cfg = ArithmeticConfig(digits=digits, num_operations=3, word_problems=True, train_size=100, test_size=20)
    train, test = arithmetic_splits(cfg, 0)
    assert (len(train), len(test)) == (100, 20)
    for p in train + test:
        assert _solve_story(p.question) == (int(p.answer), 3), p.question


def test_jsonl_skips_and_counts_malformed_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [json.dumps({"question": "1+1?", "answer": "#### 2"}), "{not json", json.dumps({"question": "x"}),
            json.dumps({"question": "2+3?", "answer": "so 5\n#### 5"}), json.dumps([1, 2]),
            json.dumps({"question": "no marker", "answer": "7"}), ""]
    path.write_text("\n".join(rows))
    problems, skipped = load_problems(str(path), "train", DataConfig(answer_format="gsm8k"))
    assert [(p.question, p.answer) for p in problems] == [("1+1?", "2"), ("2+3?", "5")]
    assert skipped == 4


def test_parquet_and_custom_fields(tmp_path):
    import datasets
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"q": "3*3?", "a": 9}, {"q": None, "a": 1}]).to_parquet(str(path))
    problems, skipped = load_problems(str(path), "train", DataConfig(question_field="q", answer_field="a"))
    assert [(p.question, p.answer) for p in problems] == [("3*3?", "9")] and skipped == 1


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_problems(str(tmp_path / "none.jsonl"), "train", DataConfig())
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_problems(str(tmp_path / "bad.jsonl"), "train", DataConfig())


def test_gsm8k_files(gsm8k_dir, tokenizer):
    cfg = DataConfig(source=str(gsm8k_dir / "train.jsonl"), test_source=str(gsm8k_dir / "test.jsonl"),
                     answer_format="gsm8k", max_test_prompts=10)
    train, test = load_prompt_sets(cfg, tokenizer, seed=0)
    assert len(train) > 7000 and len(test) == 10 and train.skipped == 0
    assert test.problems[0].answer == "18"
    text = tokenizer.decode(test.prompt_ids[0])
    assert "<|im_start|>user" in text and text.rstrip().endswith("assistant")


def test_prompt_rendering_uses_chat_template(tokenizer):
    cfg = DataConfig(system_prompt="Be brief.", prompt_template="Q: {question}",
                     arithmetic=ArithmeticConfig(train_size=5, test_size=2))
    train, _ = load_prompt_sets(cfg, tokenizer, seed=0)
    text = tokenizer.decode(train.prompt_ids[0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "Q: What is" in text


def test_a_pinned_problem_seed_keeps_the_problems_across_run_seeds(tokenizer):
    """data.arithmetic.seed pins the problems (a seed study trains on the same data); unset, run.seed draws them."""
    def questions(run_seed, problem_seed=None):
        cfg = DataConfig(arithmetic=ArithmeticConfig(train_size=50, test_size=20, seed=problem_seed))
        train, test = load_prompt_sets(cfg, tokenizer, seed=run_seed)
        return [p.question for p in train.problems], [p.question for p in test.problems]

    assert questions(0, problem_seed=0) == questions(1, problem_seed=0) == questions(0)
    assert questions(1) != questions(0)

import time

import pytest

from rewards.math import MathReward, is_value


@pytest.fixture(scope="module")
def reward():
    r = MathReward(timeout_s=2.0, format_weight=0.1)
    yield r
    r.close()


def test_right_wrong_and_malformed(reward):
    responses = ["13 + 14 = 27", "The answer is \\boxed{27}", "13 + 14 = 25", "", "\\frac{{{", "twenty seven"]
    assert reward(responses, ["27"] * 6, [True] * 6) == pytest.approx([1.1, 1.1, 0.1, 0.0, 0.0, 0.0])


def test_format_bonus_needs_a_natural_stop(reward):
    assert reward(["27"], ["27"], [False]) == [1.0]


def test_equivalent_forms(reward):
    assert reward.correctness(["$27.00$", "1/2", "0.5"], ["27", "0.5", "\\frac{1}{2}"]) == [True, True, True]


def test_adversarial_latex_times_out_instead_of_hanging(reward):
    # sympy computes 100000000! inside C (GMP): no signal interrupts it, only killing the worker does.
    tower = "\\boxed{100000000!}"
    reward.pop_counters()
    start = time.time()
    assert reward([tower], ["27"]) == [0.0]
    assert time.time() - start < 10
    assert reward.pop_counters()["timeouts"] == 1
    assert reward(["27"], ["27"]) == [1.1]  # a fresh worker serves the next call


def test_unparsable_reference_is_an_error_not_a_crash(reward):
    reward.pop_counters()
    assert reward(["5"], ["\\frac{"]) == [0.0]
    assert reward.pop_counters()["errors"] == 1


def test_restating_the_question_is_not_an_answer(reward):
    """math-verify evaluates '7 + 1' to 8; a policy learned to exploit that by restating questions."""
    responses = ["To calculate 7 + 1, you simply add them together.", "(964 * 7) * 5", "7 + 1 = 8", "8"]
    assert reward.correctness(responses, ["8", "33740", "8", "8"]) == [False, False, True, True]


@pytest.mark.parametrize("text,value", [("42", True), ("-3.5", True), ("\\frac{1}{2}", True), ("1,000", True),
                                        ("1/2", True), ("7 + 1", False), ("(964 * 7) * 5", False),
                                        ("2^{10}", False), ("3 \\times 4", False)])
def test_is_value(text, value):
    assert is_value(text) is value

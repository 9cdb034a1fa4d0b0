import time

import pytest

from rewards.math import MathReward


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
    tower = "\\boxed{" + "9^{" * 12 + "9" + "}" * 12 + "}"
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

"""Reward functions in TRL's convention (rewards/functions.py): TRL's own functions and a file next to a
config score hand-made completions as their definitions say; weights and None combine as documented;
the verdict comes from `correct_from`; a hanging or failing function is killed / reported; a function
that cannot be used stops the CLI with exit 2 before any model loads; the built-in verifier as a
function scores exactly as the default path does."""
import json
import textwrap
from pathlib import Path

import pytest

from rlpost.config import load_config
from rlpost.data import Problem
from rewards.functions import FunctionRewards, RewardError, RewardFunction, RewardFunctionError, check_signature
from rollout.types import FinishReason, Group, Sample

REPO = Path(__file__).resolve().parents[1]


def sample(text: str, ids=(1, 2, 3), finish=FinishReason.STOP) -> Sample:
    return Sample([9], list(ids), [0.0] * len(ids), finish, text=text)


def rewards(*functions, problems=None, **kwargs) -> FunctionRewards:
    problems = problems or [Problem("What is 3 + 4?", "7", {"answer": "7"})]
    return FunctionRewards(list(functions), problems, lambda p: [{"role": "user", "content": p.question}],
                           correct_from=kwargs.pop("correct_from", functions[0].name), **kwargs)


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture
def user_file(tmp_path) -> Path:
    """A reward file as a user writes it, next to its config."""
    return write(tmp_path / "my_rewards.py", '''
        import time

        def has_seven(completions, **kwargs):
            return [1.0 if "7" in c[0]["content"] else 0.0 for c in completions]

        def exact(completions, answer, **kwargs):     # a dataset column by name
            return [1.0 if c[0]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]

        def only_short(completion_ids, **kwargs):     # None: does not score long completions
            return [0.5 if len(ids) <= 3 else None for ids in completion_ids]

        def none_at_all(completions, **kwargs):
            return [None] * len(completions)

        def hang(completions, **kwargs):
            time.sleep(60)

        def crash(completions, **kwargs):
            raise KeyError("no such thing")

        def short_list(completions, **kwargs):
            return [1.0]

        def not_a_number(completions, **kwargs):
            return ["yes"] * len(completions)

        def nan(completions, **kwargs):
            return [float("nan")] * len(completions)

        def no_kwargs(prompts, completions):          # takes only what it names
            return [float(len(p)) for p in prompts]

        def needs_x(completions, x):                  # x is no argument rlpost gives
            return [0.0]
    ''')


def test_trl_think_format_reward_unchanged():
    """trl.rewards.think_format_reward's definition: 1.0 iff the completion is <think>...</think> then text."""
    f = RewardFunction("think", "trl.rewards:think_format_reward")
    r = rewards(f)
    got = [sample("<think>\nsteps\n</think>\n7"), sample("7"), sample("<think>a</think><think>b</think>c")]
    r.score([r.problems[0]] * 3, got)
    assert [s.reward for s in got] == [1.0, 0.0, 0.0]
    assert [s.correct for s in got] == [True, False, False]
    assert r.metrics() == {"reward/think": pytest.approx(1 / 3)}
    r.close()


def test_trl_soft_overlong_punishment_reads_completion_ids(tmp_path):
    """A TRL reward built by a factory, wrapped in a user file: -(L - (Lmax - cache)) / cache in the ramp."""
    write(tmp_path / "f.py", '''
        from trl.rewards import get_soft_overlong_punishment
        overlong = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)
    ''')
    r = rewards(RewardFunction("overlong", f"{tmp_path / 'f.py'}:overlong"))
    got = [sample("a", ids=range(5)), sample("b", ids=range(8)), sample("c", ids=range(12))]
    r.score([r.problems[0]] * 3, got)
    assert [s.reward for s in got] == [0.0, pytest.approx(-2 / 4), -1.0]  # 8 tokens: (6 - 8) / 4
    r.close()


def test_file_next_to_a_config_resolves_and_scores(tmp_path, user_file):
    config = tmp_path / "run.yaml"
    config.write_text("reward:\n  functions:\n    - {fn: my_rewards.py:exact, weight: 2.0}\n")
    cfg = load_config(config)
    assert cfg.reward.functions[0].fn == f"{user_file}:exact"
    f = RewardFunction("exact", cfg.reward.functions[0].fn, weight=2.0)
    problems = [Problem("What is 3 + 4?", "7", {"answer": "7"}), Problem("What is 2 * 3?", "6", {"answer": "6"})]
    r = rewards(f, problems=problems)
    got = [sample(" 7 "), sample("6"), sample("5")]
    r.score([problems[0], problems[1], problems[1]], got)
    assert [s.reward for s in got] == [2.0, 2.0, 0.0]  # weight 2 x exact match
    assert [s.correct for s in got] == [True, True, False]  # the verdict: exact's value 1.0 >= correct_threshold 1.0
    r.close()


def test_weights_none_and_the_verdict(user_file):
    seven = RewardFunction("has_seven", f"{user_file}:has_seven", weight=0.5, isolate=False)
    short = RewardFunction("only_short", f"{user_file}:only_short", weight=3.0, isolate=False)
    r = rewards(seven, short, correct_from="only_short", threshold=0.5)
    got = [sample("7", ids=[1]), sample("7 and more", ids=range(5)), sample("8", ids=[1, 2])]
    r.score([r.problems[0]] * 3, got)
    # has_seven: 1, 1, 0 (x 0.5); only_short: 0.5, None, 0.5 (x 3): None adds nothing
    assert [s.reward for s in got] == [0.5 + 1.5, 0.5, 1.5]
    assert [s.correct for s in got] == [True, False, True]  # only_short >= 0.5; None is no verdict
    assert r.pop_counters()["unverified"] == 1
    assert r.metrics() == {"reward/has_seven": pytest.approx(2 / 3), "reward/only_short": 0.5}


def test_a_sample_no_function_scores_is_an_error(user_file):
    r = rewards(RewardFunction("none_at_all", f"{user_file}:none_at_all", isolate=False))
    with pytest.raises(RewardError, match="no reward function scored completion 0"):
        r.score(r.problems, [sample("7")])


def test_a_function_without_kwargs_gets_what_it_names(user_file):
    r = rewards(RewardFunction("no_kwargs", f"{user_file}:no_kwargs"))
    got = [sample("x")]
    r.score(r.problems, got)
    assert got[0].reward == 1.0  # one message: the prompt as messages, not as text
    r.close()


@pytest.mark.parametrize("name, why", [("hang", "gave no answer within reward.timeout_s=1 s"),
                                       ("crash", "raised KeyError: 'no such thing'"),
                                       ("short_list", "returned 1 values for 2 completions"),
                                       ("not_a_number", "returned 'yes', not a finite number"),
                                       ("nan", "returned nan, not a finite number")])
def test_failures_raise_one_line_or_score_zero(user_file, name, why):
    for on_error in ("raise", "zero"):
        f = RewardFunction(name, f"{user_file}:{name}")
        r = rewards(f, on_error=on_error, timeout_s=1.0)
        got = [sample("7"), sample("8")]
        if on_error == "raise":
            with pytest.raises(RewardError) as e:
                r.score(r.problems * 2, got)
            line = str(e.value)
            assert "\n" not in line and f"reward function {name!r} {why}" in line and "completion 0 of 2" in line
        else:
            r.score(r.problems * 2, got)
            assert [s.reward for s in got] == [0.0, 0.0] and [s.correct for s in got] == [False, False]
            counts = r.pop_counters()
            assert counts[f"errors/{name}"] == 2
            assert counts[f"timeouts/{name}"] == (1 if name == "hang" else 0)
        r.close()
    # after a timeout the worker was replaced: the next call of a fresh function works
    if name == "hang":
        ok = rewards(RewardFunction("has_seven", f"{user_file}:has_seven"), timeout_s=5.0)
        ok.score(ok.problems, [sample("7")])
        ok.close()


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz: ModuleNotFoundError"),
    ("rewards.math:nope", "rewards.math has no 'nope'"),
    ("missing.py:f", "file not found"),
    ("rewards.math", "expected 'package.module:name'"),
    ("rewards.math:_GSM8K_ANSWER", "is not callable")])
def test_unusable_functions_are_one_line(spec, message):
    with pytest.raises(RewardFunctionError, match=message):
        RewardFunction("f", spec)


def test_a_signature_rlpost_cannot_call_is_refused(user_file):
    with pytest.raises(RewardFunctionError, match="required parameter 'x'"):
        check_signature(RewardFunction("f", f"{user_file}:needs_x").fn, "needs_x", ["answer"])
    check_signature(RewardFunction("f", f"{user_file}:exact").fn, "exact", ["answer"])  # a column by name


def test_the_cli_exits_2_before_any_model_loads(tmp_path, user_file, monkeypatch, capsys):
    """Every unusable function stops `rlpost train` with one line and exit 2, and no model is loaded."""
    import rlpost.trainer
    from rlpost.cli import main

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(rlpost.trainer, "Learner", no_model)
    for spec, message in [("no_such_module_xyz:f", "cannot import"), (f"{user_file}:needs_x", "required parameter 'x'"),
                          (f"{user_file}:nope", "has no 'nope'")]:
        code = main(["train", "configs/grpo_math.yaml", "--no-progress", "--set", "model.name=tiny-random",
                     "--set", f"run.output_dir={tmp_path / 'run'}", "--set", f"reward.functions=[{{fn: '{spec}'}}]"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlpost ")]
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_the_math_verifier_as_a_function_scores_as_the_default():
    """reward.functions: [{fn: rewards.math:accuracy}] gives the default path's reward and verdict."""
    from rewards.math import MathReward
    from rewards.outcome import OutcomeReward

    texts = ["7", "The answer is 7.", "3 + 4", "8", "\\boxed{7}", "seven"]
    problem = Problem("What is 3 + 4?", "7", {"answer": "7"})
    default = [sample(t) for t in texts]
    OutcomeReward(MathReward(), max_new_tokens=8)([Group(0, problem.question, "7", default)])
    as_function = [sample(t) for t in texts]
    r = rewards(RewardFunction("accuracy", "rewards.math:accuracy"), problems=[problem])
    assert not r.functions[0].isolate  # its checks run in the verifier's own worker
    r([Group(0, problem.question, "7", as_function)])
    assert [s.reward for s in as_function] == [s.reward for s in default] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert [s.correct for s in as_function] == [s.correct for s in default]


def test_train_with_a_file_reward_logs_what_the_function_saw(tmp_path, digit_model):
    """Two steps of GRPO on tiny-digits rewarded by a file function that also writes down its inputs:
    the logged reward, reward/NAME and accuracy equal what those inputs give by hand."""
    from rlpost.metrics import read_metrics
    from rlpost.trainer import train

    log = tmp_path / "calls.jsonl"
    write(tmp_path / "digits.py", f'''
        import json

        def starts_right(prompts, completions, completion_ids, answer, **kwargs):
            values = [1.0 if c[0]["content"].strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps({{"n": len(completions), "values": values, "roles": [p[-1]["role"] for p in prompts],
                                    "ids": [len(i) for i in completion_ids]}}) + "\\n")
            return values
    ''')
    config = tmp_path / "run.yaml"
    config.write_text((REPO / "configs" / "grpo_math.yaml").read_text() +
                      "\n# appended by the test\n")
    cfg = load_config(config, [f"model.name={digit_model}", f"run.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                               "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=4",
                               "eval.at_start=false", "eval.num_prompts=2", "train.micro_batch_size=8",
                               "reward.functions=[{fn: digits.py:starts_right, weight: 2.0}]",
                               "data.arithmetic.train_size=50", "data.arithmetic.test_size=10"])
    train(cfg, show_progress=False)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert len(steps) == 2 and all(c["roles"] == ["user"] * c["n"] for c in calls)
    train_calls = calls[:2]  # one call per step on its 8 samples; then the final eval's verdicts
    for row, call in zip(steps, train_calls):
        assert call["n"] == 8
        assert row["reward"] == pytest.approx(2.0 * sum(call["values"]) / 8)
        assert row["reward/starts_right"] == pytest.approx(sum(call["values"]) / 8)
        assert row["accuracy"] == pytest.approx(sum(v >= 1.0 for v in call["values"]) / 8)
    final = [r for r in read_metrics(tmp_path / "run") if "eval/accuracy" in r][-1]
    assert final["eval/accuracy"] == pytest.approx(sum(calls[2]["values"]) / 2)  # greedy verdicts, 2 prompts


def test_a_function_that_hangs_mid_run(tmp_path, digit_model, capsys):
    """The function hangs from its second call (step 2) on. on_error=zero: killed at reward.timeout_s,
    scored 0 and counted, the run finishes. on_error=raise: the run stops at step 2 with one line naming
    the function and the step, exit 1, and step 1's checkpoint stays the latest."""
    from rlpost.cli import main
    from rlpost.metrics import read_metrics

    write(tmp_path / "late.py", f'''
        import time
        from pathlib import Path

        def late_hang(completions, **kwargs):
            calls = Path({str(tmp_path / "calls")!r})
            calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
            if len(calls.read_text()) >= 2:
                time.sleep(60)
            return [float(len(c[0]["content"]) % 2) for c in completions]
    ''')
    (tmp_path / "run.yaml").write_text((REPO / "configs" / "grpo_math.yaml").read_text())
    for on_error in ("zero", "raise"):
        (tmp_path / "calls").unlink(missing_ok=True)
        run = tmp_path / on_error
        code = main(["train", str(tmp_path / "run.yaml"), "--no-progress", *[x for kv in [
            f"model.name={digit_model}", f"run.output_dir={run}", "train.max_steps=2", "checkpoint.every=1",
            "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=4", "eval.at_start=false",
            "eval.kind=none", "train.micro_batch_size=8", "reward.timeout_s=2", f"reward.on_error={on_error}",
            "reward.functions=[{fn: late.py:late_hang}]", "data.arithmetic.train_size=50",
            "data.arithmetic.test_size=10"] for x in ("--set", kv)]])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlpost ")]  # not progress bars
        latest = (run / "checkpoints" / "latest").resolve().name
        if on_error == "zero":
            assert code == 0, err
            step_2 = [r for r in read_metrics(run) if r.get("step") == 2 and "reward" in r][0]
            assert step_2["reward/timeouts/late_hang"] == 1 and step_2["reward/errors/late_hang"] == 8
            assert step_2["reward"] == 0.0 and latest == "step_2"
        else:
            assert code == 1 and len(err) == 1, err
            assert "stopped: step 2: reward function 'late_hang' gave no answer within reward.timeout_s=2 s" in err[0]
            assert "resume with --resume" in err[0] and latest == "step_1"

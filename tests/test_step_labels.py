"""Step-labelled data (ProcessBench format): labels checked by re-doing each step's arithmetic here,
independently of the generators."""
import json
import re

import pytest

from rlpost.step_labels import arithmetic_chains, corrupt_gsm8k

ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def arithmetic_ok(expr: str, stated: str) -> bool:
    """Evaluate `a op b` (or a GSM8K annotation) with a small stack machine of its own: no eval."""
    tokens = re.findall(r"\d*\.\d+|\d+|[-+*/()]", expr)

    def parse(i):  # expression := term (('+'|'-') term)*
        value, i = term(i)
        while i < len(tokens) and tokens[i] in "+-":
            rhs, j = term(i + 1)
            value, i = (value + rhs if tokens[i] == "+" else value - rhs), j
        return value, i

    def term(i):
        value, i = factor(i)
        while i < len(tokens) and tokens[i] in "*/":
            rhs, j = factor(i + 1)
            value, i = (value * rhs if tokens[i] == "*" else value / rhs), j
        return value, i

    def factor(i):
        if tokens[i] == "(":
            value, i = parse(i + 1)
            return value, i + 1
        if tokens[i] in "+-":  # unary sign (GSM8K writes "<<+30+46=76>>")
            value, j = factor(i + 1)
            return (-value if tokens[i] == "-" else value), j
        return float(tokens[i]), i + 1

    return abs(parse(0)[0] - float(stated)) < 1e-6


def label_of(steps, annotated_only=False):
    """First step whose arithmetic fails: `a op b = c` lines, or only GSM8K's annotations."""
    for k, step in enumerate(steps):
        pairs = ANNOTATION.findall(step) if annotated_only else [tuple(step.split("=", 1))]
        if not all(arithmetic_ok(e, v.strip()) for e, v in pairs):
            return k
    return -1


def test_arithmetic_chains_are_seeded_labelled_and_propagate():
    chains = arithmetic_chains(200, seed=3)
    assert [c.steps for c in chains] == [c.steps for c in arithmetic_chains(200, seed=3)]
    assert {c.label for c in chains} == {-1, 0, 1, 2, 3}
    for c in chains:
        assert label_of(c.steps) == c.label
        for prev, step in zip(c.steps, c.steps[1:]):  # a later step starts from the previous (maybe wrong) result
            assert step.split(" ")[0] == prev.rsplit("= ", 1)[1]
        assert c.answer == c.steps[-1].rsplit("= ", 1)[1]


def test_gsm8k_corruption_is_labelled_and_propagates(gsm8k_dir):
    rows = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()[:300]]
    made = [corrupt_gsm8k(r["question"], r["answer"], seed=i) for i, r in enumerate(rows)]
    again = [corrupt_gsm8k(r["question"], r["answer"], seed=i) for i, r in enumerate(rows)]
    assert [m and m.steps for m in made] == [m and m.steps for m in again]
    made = [m for m in made if m is not None]
    assert len(made) > 200 and 0.3 < sum(m.label >= 0 for m in made) / len(made) < 0.7
    propagated = 0
    for m, row in zip(made, rows):
        assert label_of(m.steps, annotated_only=True) == m.label
        if m.label >= 0:
            assert not all(arithmetic_ok(e, v) for e, v in ANNOTATION.findall(m.steps[m.label]))
            later = [s for s in m.steps[m.label + 1:] if ANNOTATION.search(s)]
            assert all(arithmetic_ok(e, v) for s in later for e, v in ANNOTATION.findall(s))
    for m in made:  # the error reaches later steps (some rows at least) and the final answer follows it
        if m.label >= 0 and any(ANNOTATION.search(s) for s in m.steps[m.label + 1:]):
            original = next(r for r in rows if r["question"] == m.problem)["answer"]
            propagated += m.steps[-1] not in original
    assert propagated > 10

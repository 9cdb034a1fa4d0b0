"""The reward of configs/grpo_plural.yaml, a task that is not math: give the plural of an English noun.
A reward function in TRL's convention (docs/rewards.md), plugged in by config alone."""
import re


def reply_word(text: str) -> str:
    """The answer in a reply: the last double-quoted span when there is one ('The plural of "fox" is
    "foxes".' -> foxes), else the whole reply; outer quotes and a final . or ! dropped, lowercased."""
    quoted = re.findall(r'"([^"]+)"', text)
    word = quoted[-1] if quoted else text
    return word.strip().strip("\"'").rstrip(".!").strip().lower()


def plural(completions, plurals, **kwargs):
    """1.0 when the reply's answer is one of the row's accepted plurals (the `plurals` column)."""
    return [1.0 if reply_word(c[0]["content"]) in accepted else 0.0 for c, accepted in zip(completions, plurals)]

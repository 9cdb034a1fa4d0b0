"""Prompt datasets: a seeded arithmetic generator, or question/answer rows from jsonl / parquet / hub.

Rows that cannot be used (bad JSON, missing field, no parsable answer) are skipped and counted,
never fatal. Prompts are rendered with the tokenizer's chat template.
"""
from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from rewards.math import gsm8k_answer
from rollout.types import FinishReason, Group, Sample, UserError
from rlpost.config import ArithmeticConfig, DataConfig


class DataError(UserError):
    """A data source that cannot be used at all (missing file, no usable rows)."""


@dataclass
class Problem:
    question: str
    answer: str    # the reference answer the math verifier checks
    columns: dict = field(default_factory=dict)  # the row's other columns, as reward functions get them (TRL)
    messages: list[dict] | None = None  # a conversational prompt (data.prompts_from=pairs); None: the question


@dataclass
class PromptSet:
    problems: list[Problem]
    prompt_ids: list[list[int]] = field(default_factory=list)
    skipped: int = 0   # malformed rows dropped while loading
    too_long: int = 0  # prompts over data.max_prompt_tokens, dropped

    def __len__(self) -> int:
        return len(self.problems)

    def longest(self) -> int:
        """Tokens of the longest prompt (what sizes vLLM's context and KV cache; 0 when empty)."""
        return max(map(len, self.prompt_ids), default=0)


# ---------------------------------------------------------------------------------------------
# Built-in arithmetic problems

_WORD_TEMPLATES = {
    "+": ("{name} has {a} {thing}. {pron} gets {b} more.", "{name} has {a} {thing}. {pron} gets {b} more {thing}."),
    "-": ("{name} has {a} {thing}. {pron} gives away {b}.", "{name} has {a} {thing} and gives away {b} of them."),
    "*": ("{name} has {a} boxes with {b} {thing} in each.", "{name} buys {a} bags of {b} {thing} each."),
}
_FOLLOW_UPS = {"+": "{pron} gets {b} more.", "-": "{pron} gives away {b}."}
_NAMES = [("Sam", "He"), ("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Noah", "He"), ("Zoe", "She")]
_THINGS = ["apples", "marbles", "stickers", "coins", "books", "shells"]


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _arithmetic_problem(rng: random.Random, cfg: ArithmeticConfig) -> Problem:
    value = _operand(rng, cfg.digits)
    if cfg.word_problems:
        name, pron = rng.choice(_NAMES)
        thing = rng.choice(_THINGS)
        sentences = []
    expr = str(value)
    for k in range(cfg.num_operations):
        op = rng.choice(cfg.operations)
        b = _operand(rng, 1 if op == "*" else cfg.digits)
        if op == "-":  # keep every intermediate result non-negative (a story cannot give away more)
            b = rng.randint(0, value) if value < 10 ** cfg.digits else b
        if cfg.word_problems:
            if k > 0 and op == "*":  # "boxes of" only reads well as the first step
                op = "+"
            # the first step states the start amount; later steps only say what changes
            template = rng.choice(_WORD_TEMPLATES[op]) if k == 0 else _FOLLOW_UPS[op]
            sentences.append(template.format(name=name, pron=pron, a=value, b=b, thing=thing))
        expr = f"({expr} {op} {b})" if k < cfg.num_operations - 1 else f"{expr} {op} {b}"
        value = eval(expr)  # noqa: S307 - expression built above from ints and + - *
    if cfg.word_problems:
        question = " ".join(sentences) + f" How many {thing} does {name} have now?"
    else:
        question = f"What is {expr.replace('(', '').replace(')', '') if cfg.num_operations == 1 else expr}?"
    return Problem(question=question, answer=str(value), columns={"answer": str(value)})


def arithmetic_splits(cfg: ArithmeticConfig, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train/test problem lists; sizes are capped by how many distinct problems exist."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(n: int) -> list[Problem]:
        out: list[Problem] = []
        misses = 0
        while len(out) < n and misses < 50 * n:
            p = _arithmetic_problem(rng, cfg)
            if p.question in seen:
                misses += 1
                continue
            seen.add(p.question)
            out.append(p)
        return out

    # Draw both splits at once: when the problem space is small, both shrink in proportion instead
    # of the test split swallowing everything.
    problems = draw(cfg.train_size + cfg.test_size)
    n_test = round(len(problems) * cfg.test_size / (cfg.train_size + cfg.test_size))
    return problems[n_test:], problems[:n_test]


# ---------------------------------------------------------------------------------------------
# Files and hub datasets



def _extract_answer(raw, answer_format: str) -> str | None:
    if raw is None:
        return None
    text = str(raw).strip()
    if answer_format == "gsm8k":
        return gsm8k_answer(text)
    return text or None


def _read_rows(source: str, split: str, span: tuple[int, int] | None = None) -> tuple[list, int]:
    """Raw rows and the number of lines that were not valid JSON objects; with `span` (data.rows)
    only the rows start..stop-1 in file order, chosen before anything is parsed or skipped."""
    path = Path(source).expanduser()
    jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    if (jsonl or path.suffix in (".json", ".parquet")) and not path.exists():
        raise DataError(f"data file not found: {path}")
    if jsonl:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        lines = _span([line for line in data.splitlines() if line.strip()], span, source)
        rows = []
        for raw in lines:
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):  # a bad row is skipped, never the whole file
                row = None
            if isinstance(row, dict):
                rows.append(row)
        return rows, len(lines) - len(rows)
    import datasets

    try:
        if path.suffix in (".json", ".parquet"):
            ds = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise DataError(f"cannot load dataset {source!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    return _span(list(ds), span, source), 0


def _span(rows: list, span: tuple[int, int] | None, source: str) -> list:
    if span is None:
        return rows
    if span[0] >= len(rows):
        raise DataError(f"{source!r} has {len(rows)} rows: the row range {list(span)} selects none")
    return rows[span[0]:span[1]]


def _pair_prompt(row: dict, cfg: DataConfig) -> Problem | None:
    """data.prompts_from=pairs: the prompt of a preference row as chat messages, no reference answer."""
    if not all(isinstance(row.get(k), (str, list)) for k in ("chosen", "rejected")):
        return None
    example = {k: row[k] for k in ("prompt", "chosen", "rejected") if k in row}
    try:
        prompt = _split_hh(example)["prompt"]
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if isinstance(prompt, str):  # an HH dialogue, or a standard prompt: one user message
        messages = hh_messages(prompt) if _HH_TURN.match(prompt) else [{"role": "user", "content": prompt}]
    else:
        messages = prompt
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not all(isinstance(u, str) for u in users) or not users[-1].strip():
        return None
    answer = row.get(cfg.answer_field)
    columns = {k: v for k, v in row.items() if k != "prompt"}
    return Problem(question=users[-1].strip(), answer="" if answer is None else str(answer), columns=columns,
                   messages=messages)


def load_problems(source: str, split: str, cfg: DataConfig, span: tuple[int, int] | None = None
                  ) -> tuple[list[Problem], int]:
    rows, skipped = _read_rows(source, split, span)
    problems = []
    for row in rows:
        if cfg.prompts_from == "pairs":
            problem = _pair_prompt(row, cfg)
            skipped += problem is None
            problems += [problem] if problem is not None else []
            continue
        question = row.get(cfg.question_field)
        answer = _extract_answer(row.get(cfg.answer_field), cfg.answer_format)
        if not isinstance(question, str) or not question.strip() or answer is None:
            skipped += 1
            continue
        columns = {k: v for k, v in row.items() if k != cfg.question_field}
        problems.append(Problem(question=question.strip(), answer=answer, columns=columns))
    if not problems:
        shape = ("preference rows (prompt + chosen/rejected, or Anthropic HH chosen/rejected)"
                 if cfg.prompts_from == "pairs" else
                 f"fields {cfg.question_field!r}/{cfg.answer_field!r}, answer format {cfg.answer_format!r}")
        raise DataError(f"{source!r} has no usable rows ({shape}; {skipped} rows skipped)")
    return problems, skipped


# ---------------------------------------------------------------------------------------------

def prompt_messages(problem: Problem, cfg: DataConfig) -> list[dict]:
    """The chat messages a prompt is rendered from (what reward functions get as `prompts`)."""
    if problem.messages is not None:
        messages = [dict(m) for m in problem.messages]
    else:
        messages = [{"role": "user", "content": cfg.prompt_template.format(question=problem.question)}]
    if cfg.system_prompt is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def render_prompt(tokenizer, problem: Problem, cfg: DataConfig) -> list[int]:
    messages = prompt_messages(problem, cfg)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def load_prompt_sets(cfg: DataConfig, tokenizer, seed: int) -> tuple[PromptSet, PromptSet]:
    """(train, test) prompt sets, tokenized."""
    if cfg.source == "arithmetic":
        train, test = arithmetic_splits(cfg.arithmetic, seed if cfg.arithmetic.seed is None else cfg.arithmetic.seed)
        train_set, test_set = PromptSet(train), PromptSet(test)
    else:
        train, bad_train = load_problems(cfg.source, cfg.train_split, cfg, cfg.rows)
        test, bad_test = load_problems(cfg.test_source or cfg.source, cfg.test_split, cfg, cfg.test_rows)
        train_set, test_set = PromptSet(train, skipped=bad_train), PromptSet(test, skipped=bad_test)
    if cfg.max_train_prompts:
        train_set.problems = train_set.problems[:cfg.max_train_prompts]
    if cfg.max_test_prompts:
        test_set.problems = test_set.problems[:cfg.max_test_prompts]
    for prompt_set in (train_set, test_set):
        rendered = [(p, render_prompt(tokenizer, p, cfg)) for p in prompt_set.problems]
        # A prompt longer than data.max_prompt_tokens (chat template included) is dropped, not cut:
        # a truncated question is a different question, and its answer would be scored as this one's.
        kept = [(p, ids) for p, ids in rendered if len(ids) <= cfg.max_prompt_tokens]
        prompt_set.too_long = len(rendered) - len(kept)
        prompt_set.problems, prompt_set.prompt_ids = [p for p, _ in kept], [ids for _, ids in kept]
    if not train_set.problems or not test_set.problems:
        raise DataError(f"no prompt fits data.max_prompt_tokens={cfg.max_prompt_tokens} "
                        f"({train_set.too_long + test_set.too_long} too long)")
    return train_set, test_set


# ---------------------------------------------------------------------------------------------
# Fixed responses (the dataset rollout source)

_RESPONSE_KEYS = (("chosen", "rejected"), ("completion",), ("completions",))
_LAST_TURN = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(text: str) -> list[dict]:
    """An Anthropic HH string ("\n\nHuman: ...\n\nAssistant: ...") -> chat messages; a final empty
    assistant turn (a prompt awaiting its answer) is dropped."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("not an Anthropic HH conversation")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    return messages[:-1] if messages[-1]["role"] == "assistant" and not messages[-1]["content"] else messages


@dataclass
class ResponseSet:
    """Groups of fixed responses: a preference pair is a group [chosen, rejected] whose verdicts are
    set from the file (chosen correct), so pairs need no verifier; completions are left unscored."""
    train: list[Group]
    held_out: list[Group]
    skipped: int = 0    # rows in no known shape, chosen == rejected, an empty response
    truncated: int = 0  # rows whose prompt or a response was cut to the token limits


def _split_hh(example: dict) -> dict:
    """Anthropic HH rows are two whole conversations. TRL's `maybe_extract_prompt` takes their common
    start as the prompt; that start can run into the final assistant turns when both begin alike, so
    the prompt is cut back to end with the last "\n\nAssistant:" and the rest returned to each reply."""
    from trl.data_utils import maybe_extract_prompt

    example = maybe_extract_prompt(example)
    prompt = example["prompt"]
    if isinstance(prompt, str) and _LAST_TURN in prompt and not prompt.rstrip().endswith(_LAST_TURN.strip()):
        cut = prompt.rindex(_LAST_TURN) + len(_LAST_TURN)
        tail = prompt[cut:]
        example = {"prompt": prompt[:cut], "chosen": tail + example["chosen"], "rejected": tail + example["rejected"]}
    return example


def _response_group(row: dict, index: int, cfg: DataConfig, tokenizer) -> tuple[Group | None, bool]:
    """One row -> (group or None when unusable, whether it was truncated)."""
    from trl.data_utils import maybe_apply_chat_template

    keys = next((k for k in _RESPONSE_KEYS if all(key in row for key in k)), None)
    if keys is None:
        return None, False
    try:
        example = {k: row[k] for k in ("prompt", *keys) if k in row}
        if keys == ("chosen", "rejected"):
            example = _split_hh(example)
            if cfg.hh_format == "messages" and isinstance(example["prompt"], str):
                example = {"prompt": hh_messages(example["prompt"]),
                           **{k: hh_messages(_LAST_TURN + example[k]) for k in keys}}
        responses = example["completions"] if keys == ("completions",) else [example[k] for k in keys]
        rendered = [maybe_apply_chat_template({"prompt": example["prompt"], "completion": r}, tokenizer)
                    for r in responses]
    except (KeyError, TypeError, ValueError, IndexError):
        return None, False
    texts = [r["completion"] for r in rendered]
    if not all(t.strip() for t in texts) or (keys == ("chosen", "rejected") and texts[0] == texts[1]):
        return None, False
    prompt_ids = tokenizer(rendered[0]["prompt"], add_special_tokens=False).input_ids
    cut = len(prompt_ids) > cfg.max_prompt_tokens
    prompt_ids = prompt_ids[-cfg.max_prompt_tokens:]
    samples = []
    stored = _stored_ids(row, keys, responses, tokenizer)
    for text, stopped, kept in zip(texts, _ended(row, keys, len(texts)), stored):
        ids = kept if kept is not None else response_ids(tokenizer, text, stopped)
        stopped = ids[-1:] == [tokenizer.eos_token_id]
        cut |= len(ids) > cfg.max_response_tokens
        stopped &= len(ids) <= cfg.max_response_tokens
        ids = ids[:cfg.max_response_tokens]
        finish = FinishReason.STOP if stopped else FinishReason.LENGTH
        samples.append(Sample(list(prompt_ids), ids, [0.0] * len(ids), finish, text=text))
    if keys == ("chosen", "rejected"):
        chosen, rejected = samples if not cfg.swap_pairs else samples[::-1]
        chosen.correct, chosen.reward, rejected.correct, rejected.reward = True, 1.0, False, 0.0
        samples = [chosen, rejected]
    answer = row.get(cfg.answer_field)
    columns = {"margin": float(row["margin"])} if isinstance(row.get("margin"), (int, float)) else {}
    return Group(index, rendered[0]["prompt"], "" if answer is None else str(answer), samples, columns), cut


def _stored_ids(row: dict, keys: tuple, responses: list, tokenizer) -> list[list[int] | None]:
    """The generated token ids a row carries (`chosen_ids` / `rejected_ids` / `completion_ids`, as
    scripts/sample_pairs.py writes them), for each response whose ids decode to its text with this
    tokenizer; None where there are none or they are another tokenizer's (the text is encoded then).
    Generated ids need not be the tokenizer's own encoding of their text (a sampled word can come in
    two pieces the tokenizer would merge), so only the stored ids give back exactly what was sampled."""
    if keys == ("completions",):
        return [None] * len(responses)
    out = []
    for key, response in zip(keys, responses):
        ids = row.get(f"{key}_ids")
        text = response if isinstance(response, str) else "".join(m.get("content", "") for m in response)
        ok = (isinstance(ids, list) and ids and all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids)
              and tokenizer.decode(ids, skip_special_tokens=True) == text)
        out.append(list(ids) if ok else None)
    return out


def _ended(row: dict, keys: tuple, n: int) -> list[bool]:
    """Which responses ended with EOS: all, but those a `<key>_truncated` column marks as cut at the
    generation limit (scripts/sample_pairs.py writes them; `completions_truncated` is a list)."""
    if keys == ("completions",):
        flags = row.get("completions_truncated")
        return [not bool(f) for f in flags] if isinstance(flags, list) and len(flags) == n else [True] * n
    return [not bool(row.get(f"{k}_truncated", False)) for k in keys]


def response_ids(tokenizer, text: str, ended: bool = True) -> list[int]:
    """A fixed response as the engine generates it: its tokens, then the EOS token that ended it
    (none for a response cut at the generation limit). A chat template that closes the assistant
    turn with EOS (and a newline) already wrote it: that closing is replaced by the one EOS token
    the policy generates, not doubled."""
    eos = tokenizer.eos_token
    closed = text.rstrip()
    if eos and closed.endswith(eos):
        text = closed[:-len(eos)]
    return tokenizer(text, add_special_tokens=False).input_ids + ([tokenizer.eos_token_id] if ended else [])


def load_response_groups(cfg: DataConfig, tokenizer, seed: int = 0) -> ResponseSet:
    """Rows of `data.source` with fixed responses -> one Group per row, for offline objectives.

    Formats (TRL's dataset formats, standard strings or conversational message lists): preference
    rows `prompt / chosen / rejected`, or `chosen / rejected` whole conversations with the prompt
    implicit (Anthropic HH: see `_split_hh`); prompt-completion rows `prompt / completion`, or
    `prompt / completions` (a list). TRL's `maybe_extract_prompt` and `maybe_apply_chat_template`
    render them; each response ends with the one EOS token the engine generates (`response_ids`),
    unless a `chosen_truncated` / `rejected_truncated` / `completion_truncated` column (a list
    `completions_truncated`) marks it as cut at the generation limit. `data.answer_field`, when
    present, is kept as the group's answer for the verifier. Unusable rows are skipped and counted; long ones are cut
    (see DataConfig.max_prompt_tokens / max_response_tokens) and counted. The held-out rows are
    `data.test_source`, or else `data.held_out` rows drawn from the source with the run's seed.
    """
    def load(source: str, span, offset: int = 0) -> tuple[list[Group], int, int]:
        rows, skipped = _read_rows(source, cfg.train_split, span)
        groups, truncated = [], 0
        for row in rows:
            group, cut = _response_group(row, offset + len(groups), cfg, tokenizer)
            skipped += group is None
            truncated += cut
            if group is not None:
                groups.append(group)
        return groups, skipped, truncated

    groups, skipped, truncated = load(cfg.source, cfg.rows)
    if cfg.test_source:
        held_out, more_skipped, more_truncated = load(cfg.test_source, cfg.test_rows, offset=len(groups))
        skipped, truncated = skipped + more_skipped, truncated + more_truncated
    else:
        order = list(range(len(groups)))
        random.Random(seed).shuffle(order)
        chosen = set(order[:cfg.held_out])
        held_out = [g for i, g in enumerate(groups) if i in chosen]
        groups = [g for i, g in enumerate(groups) if i not in chosen]
    for i, g in enumerate(groups):  # prompt ids index the training rows
        g.prompt_id = i
    if not groups:
        raise DataError(f"{cfg.source!r} has no usable rows with fixed responses (prompt + chosen/rejected, "
                        f"completion or completions; {skipped} rows skipped)")
    return ResponseSet(groups, held_out, skipped, truncated)

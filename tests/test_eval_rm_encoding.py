"""eval-rm scores the tokens a trained model saw (issue 23, item 2): the process suite encodes a
solution as the trainer encodes a response, best-of-N scores the ids the engine generated."""
import json

from rlpost.config import DataConfig
from rlpost.data import load_response_groups
from rlpost.eval_rm import chat_prompt, encode, encode_generated
from rollout.types import FinishReason, Sample


def test_process_items_are_encoded_as_training_rows(tmp_path, tokenizer):
    """The same solution through the dataset source (how a PRM is trained on it) and through the
    process suite's encoding: identical prompt and response ids; the last step ends at the EOS."""
    steps = ["3 + 4 = 7", "7 * 2 = 14", "14 - 5 = 9", "The answer is 9."]
    row = {"prompt": [{"role": "user", "content": "Compute (3 + 4) * 2 - 5."}],
           "completion": [{"role": "assistant", "content": "\n\n".join(steps)}]}
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps(row) + "\n")
    trained = load_response_groups(DataConfig(source=str(path), max_response_tokens=10_000), tokenizer).train[0].samples[0]
    sample, ends = encode(tokenizer, chat_prompt(tokenizer, row["prompt"][0]["content"]), steps)
    assert (sample.prompt_ids, sample.response_ids) == (trained.prompt_ids, trained.response_ids)
    assert sample.response_ids[-1] == tokenizer.eos_token_id and ends[-1] == len(sample.response_ids) - 1
    for k, end in enumerate(ends[:-1]):  # each earlier step ends on the token that carries its "\n\n"
        assert tokenizer.decode(sample.response_ids[:end + 1]) == "\n\n".join(steps[:k + 1]) + "\n\n"


def test_best_of_n_scores_the_generated_ids(tokenizer):
    """Generated ids that are not the tokenizer's own encoding of their text (a word sampled in two
    pieces) and the generated EOS are scored as they are; step ends follow the "\n\n" in the text."""
    first = tokenizer("Step one", add_special_tokens=False).input_ids
    pieces = [tokenizer.convert_tokens_to_ids(t) for t in ("ĠS", "tep")] if "ĠS" in tokenizer.get_vocab() else []
    second = tokenizer(" two", add_special_tokens=False).input_ids
    gap = tokenizer("\n\n", add_special_tokens=False).input_ids
    ids = first + gap + tokenizer("Then", add_special_tokens=False).input_ids + pieces + second + [tokenizer.eos_token_id]
    text = tokenizer.decode(ids[:-1], skip_special_tokens=True)
    assert tokenizer(text, add_special_tokens=False).input_ids != ids[:-1] or not pieces  # really non-canonical
    sample = Sample([1, 2], ids, [0.0] * len(ids), FinishReason.STOP, text=text)
    scored, ends = encode_generated(tokenizer, [1, 2], sample)
    assert scored.response_ids == ids
    assert ends == [len(first) + len(gap) - 1, len(ids) - 1]
    cut = Sample([1, 2], ids[:-1], [0.0] * (len(ids) - 1), FinishReason.LENGTH, text=text)
    scored, ends = encode_generated(tokenizer, [1, 2], cut)
    assert scored.response_ids == ids[:-1] and ends[-1] == len(ids) - 2

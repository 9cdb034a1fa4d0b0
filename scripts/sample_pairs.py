"""Write a preference file from a model's own samples: for each training prompt of a config, G answers,
scored by the math verifier, and correct-over-incorrect pairs (rlpost/objectives/dpo.build_pairs).

    .venv/bin/python scripts/sample_pairs.py configs/aligndistil_math.yaml --out runs/pairs/train.jsonl
    .venv/bin/python scripts/sample_pairs.py configs/aligndistil_math.yaml --split test --out runs/pairs/test.jsonl

Rows are TRL's conversational preference format (`prompt` as chat messages, `chosen` / `rejected`
as one assistant message each, with `chosen_truncated` / `rejected_truncated` (cut at
max_new_tokens) and `chosen_ids` / `rejected_ids` (the generated token ids)), so `rollout.scheduler:
dataset` reads them back as the engine generated them: the prompt through the chat template as it
was rendered for sampling, each response's own ids (with EOS only if it ended by itself). The DPO and reverse-DPO teachers of
AlignDistil are trained on such a file (see docs/aligndistil.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pair_rows(groups, problems, data_cfg, pairs_per_group: int = 1) -> list[dict]:
    """Correct-over-incorrect pairs of each scored group as rows: the prompt as the chat messages the
    policy saw, each response as one assistant message, whether it was cut at max_new_tokens, and
    the token ids the engine generated (reading the row back with the same tokenizer gives exactly
    those ids; with another tokenizer the text is encoded, without EOS after a cut response)."""
    from rlpost.data import prompt_messages
    from rlpost.objectives.dpo import build_pairs
    rows = []
    for g in groups:
        prompt = prompt_messages(problems[g.prompt_id], data_cfg)
        for c, w in build_pairs([bool(s.correct) for s in g.samples], pairs_per_group):
            chosen, rejected = g.samples[c], g.samples[w]
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen.text}],
                         "rejected": [{"role": "assistant", "content": rejected.text}], "answer": g.answer,
                         "chosen_truncated": chosen.truncated, "rejected_truncated": rejected.truncated,
                         "chosen_ids": chosen.response_ids, "rejected_ids": rejected.response_ids})
    return rows


def main() -> int:
    from rlpost.config import load_config
    from rlpost.data import load_prompt_sets
    from rewards.math import MathReward
    from rewards.outcome import OutcomeReward
    from rollout.engine import make_engine
    from rollout.models import load_tokenizer
    from rollout.source import generate_groups
    from rollout.types import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--pairs-per-group", type=int, default=1)
    parser.add_argument("--split", choices=["train", "test"], default="train",
                        help="sample the config's training prompts (default) or its held-out ones")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model.name)
    train, test = load_prompt_sets(cfg.data, tokenizer, cfg.run.seed)
    prompts = train if args.split == "train" else test
    engine = make_engine(cfg.rollout.engine, cfg.model.name, tokenizer, max_batch_size=cfg.rollout.max_batch_size,
                         seed=cfg.run.seed, **cfg.vllm_options(prompts.longest()))
    verifier = MathReward(timeout_s=cfg.reward.timeout_s)
    r = cfg.rollout
    ids = list(range(len(prompts)))
    groups = []
    for start in range(0, len(ids), r.prompts_per_step):
        chunk = ids[start:start + r.prompts_per_step]
        groups += generate_groups(engine, prompts, chunk, [r.group_size] * len(chunk),
                                  SamplingParams(r.max_new_tokens, r.temperature, r.top_p, seed=cfg.run.seed + start))
    OutcomeReward(verifier, max_new_tokens=r.max_new_tokens)(groups)
    verifier.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = pair_rows(groups, prompts.problems, cfg.data, args.pairs_per_group)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    correct = [bool(s.correct) for g in groups for s in g.samples]
    print(f"{len(rows)} pairs from {len(groups)} prompts x {r.group_size} samples "
          f"({sum(correct) / len(correct):.3f} of samples correct) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

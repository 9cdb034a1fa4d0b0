"""Write a preference file from a model's own samples: for each training prompt of a config, G answers,
scored by the math verifier, and correct-over-incorrect pairs (rlpost/objectives/dpo.build_pairs).

    .venv/bin/python scripts/sample_pairs.py configs/aligndistil_math.yaml --out runs/pairs/train.jsonl
    .venv/bin/python scripts/sample_pairs.py configs/aligndistil_math.yaml --split test --out runs/pairs/test.jsonl

Rows are TRL's conversational preference format (`prompt` as chat messages, `chosen` / `rejected`
as one assistant message each), so `rollout.scheduler: dataset` reads them back through the chat
template exactly as the prompts were rendered for sampling. The DPO and reverse-DPO teachers of
AlignDistil are trained on such a file (see docs/aligndistil.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    from rlpost.config import load_config
    from rlpost.data import load_prompt_sets
    from rlpost.objectives.dpo import build_pairs
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
                         seed=cfg.run.seed, **cfg.vllm_options())
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
    rows = 0
    with out.open("w") as f:
        for g in groups:
            prompt = [{"role": "user", "content": cfg.data.prompt_template.format(question=g.prompt)}]
            if cfg.data.system_prompt is not None:
                prompt.insert(0, {"role": "system", "content": cfg.data.system_prompt})
            for c, w in build_pairs([bool(s.correct) for s in g.samples], args.pairs_per_group):
                f.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": g.samples[c].text}],
                                    "rejected": [{"role": "assistant", "content": g.samples[w].text}],
                                    "answer": g.answer}) + "\n")
                rows += 1
    correct = [bool(s.correct) for g in groups for s in g.samples]
    print(f"{rows} pairs from {len(groups)} prompts x {r.group_size} samples "
          f"({sum(correct) / len(correct):.3f} of samples correct) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write step-labelled solutions (rlpost/step_labels.py) as one jsonl that serves two uses:

- training an implicit PRM from outcome labels only: each row is a conversational `prompt /
  completion` with the problem's true `answer`, so the dataset source loads it and the verifier
  decides whether the final answer is right (the step labels are never read in training);
- evaluating it: the same row carries the ProcessBench fields `problem`, `steps`, `label`, which
  `rlpost eval-rm --process FILE` reads (StepSolution.as_row).

    .venv/bin/python scripts/make_step_data.py arithmetic --n 3000 --seed 1 --out runs/data/arith_steps_train.jsonl
    .venv/bin/python scripts/make_step_data.py gsm8k --source ../shared/data/gsm8k/test.jsonl \
        --n 400 --seed 2 --out runs/data/gsm8k_steps_test.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlpost.step_labels import arithmetic_chains, corrupt_gsm8k  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["arithmetic", "gsm8k"])
    parser.add_argument("--n", type=int, required=True, help="solutions to write (at most, for gsm8k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4, help="arithmetic: operations per chain")
    parser.add_argument("--source", help="gsm8k: a GSM8K jsonl (question / answer)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.kind == "arithmetic":
        solutions = arithmetic_chains(args.n, args.seed, num_steps=args.steps)
    else:
        if not args.source or not Path(args.source).is_file():
            print(f"error: --source must be a GSM8K jsonl file (got {args.source!r})", file=sys.stderr)
            return 2
        solutions = []
        for i, line in enumerate(Path(args.source).read_text().splitlines()):
            if len(solutions) >= args.n:
                break
            r = json.loads(line)
            s = corrupt_gsm8k(r["question"], r["answer"], seed=args.seed * 1_000_003 + i)
            if s is not None:
                solutions.append(s)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(s.as_row()) + "\n" for s in solutions))
    wrong = sum(s.label >= 0 for s in solutions)
    print(f"wrote {len(solutions)} solutions ({wrong} with an error) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reward-model evaluation script of the design card: the same as `rlpost eval-rm` (rlpost/eval_rm.py
says what it scores and how), e.g.

    .venv/bin/python scripts/eval_reward_model.py --prm runs/prm_steps --process runs/data/arith_steps_test.jsonl
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlpost.eval_rm import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

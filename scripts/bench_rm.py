"""A reward model trained by rlpost and by TRL's RewardTrainer on the same pairs, side by side.

    .venv/bin/python scripts/bench_rm.py [--steps 40] [--out runs/bench_rm] [CONFIG] [--set key=value ...]

Both start from the config's model with a fresh one-label head (the same seed, so the same initial
head), train on the same token ids (rlpost's encoding of the config's preference file: TRL gets them
as pre-tokenised `chosen_ids` / `rejected_ids`), the same number of steps of the same number of pairs,
AdamW at the same constant learning rate with clipping at 1.0, in float32 and with the config's
`train.backward` (TRL's own defaults, bf16 autocast and gradient checkpointing, with --trl-defaults).
What differs is each trainer's own: the order of the pairs (each shuffles with its seed), AdamW's
beta2 (rlpost 0.99, TRL 0.999), and the machinery around the step. Both final models are scored by the same code (plain transformers, one
pair at a time) on the config's held-out pairs. Each trainer runs in its own process, one after the
other; the table gives held-out accuracy, seconds per step and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pairs_of(groups):
    return [(g.samples[0], g.samples[1]) for g in groups]  # [chosen, rejected] as the file labels them


def load(config: str, overrides: list[str]):
    from rlpost.build import load_data
    from rlpost.config import load_config
    from rollout.models import load_tokenizer
    cfg = load_config(config, overrides)
    tokenizer = load_tokenizer(cfg.model.name)
    return cfg, tokenizer, load_data(cfg, tokenizer).responses


def held_out_accuracy(model_dir: str, config: str, overrides: list[str]) -> dict:
    import torch
    from rollout.models import load_classifier
    cfg, tokenizer, data = load(config, overrides)
    model, _ = load_classifier(model_dir)
    model.eval()
    right = ties = 0
    with torch.no_grad():
        for chosen, rejected in pairs_of(data.held_out):
            r = [model(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).logits[0, 0].item()
                 for s in (chosen, rejected)]
            right, ties = right + (r[0] > r[1]), ties + (r[0] == r[1])
    n = len(data.held_out)
    return {"accuracy": right / n, "ties": ties / n, "pairs": n}


def run_trl(config: str, overrides: list[str], steps: int, out: Path, trl_defaults: bool = False) -> dict:
    import datasets
    import torch
    from trl import RewardConfig, RewardTrainer
    from rollout.models import load_classifier
    cfg, tokenizer, data = load(config, overrides)
    rows = [{"chosen_ids": c.prompt_ids + c.response_ids, "rejected_ids": r.prompt_ids + r.response_ids}
            for c, r in pairs_of(data.train)]
    torch.manual_seed(cfg.run.seed)
    model, _ = load_classifier(cfg.model.name, num_labels=1)
    args = RewardConfig(output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=cfg.rollout.prompts_per_step,
                        learning_rate=cfg.train.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                        max_grad_norm=cfg.train.max_grad_norm, logging_steps=10, save_strategy="no", report_to=[],
                        use_cpu=True, seed=cfg.run.seed, max_length=None, center_rewards_coefficient=None,
                        dataloader_num_workers=0, disable_tqdm=True,
                        **({} if trl_defaults else {"bf16": False,
                                                   "gradient_checkpointing": cfg.train.backward == "checkpointing"}))
    trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(out / "trl" / "final"))
    tokenizer.save_pretrained(str(out / "trl" / "final"))
    return {"s_per_step": result.metrics["train_runtime"] / steps, "final": str(out / "trl" / "final")}


def run_rlpost(config: str, overrides: list[str], steps: int, out: Path, trl_defaults: bool = False) -> dict:
    from rlpost.metrics import read_metrics
    from rlpost.trainer import train
    from rlpost.config import load_config
    cfg = load_config(config, [*overrides, f"run.output_dir={out / 'rlpost'}", f"train.max_steps={steps}",
                               "eval.at_start=false", "eval.every=0", f"checkpoint.every={steps}"])
    train(cfg, show_progress=False)
    times = [r["step_s"] for r in read_metrics(out / "rlpost") if "step_s" in r]
    return {"s_per_step": sum(times) / len(times), "final": str(out / "rlpost" / "checkpoints" / "latest" / "hf")}


def child(args) -> int:
    """One trainer in this process (called by main with --child NAME)."""
    run = run_trl if args.child == "trl" else run_rlpost
    result = run(args.config, args.overrides, args.steps, Path(args.out), args.trl_defaults)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    result.update(held_out_accuracy(result["final"], args.config, args.overrides))
    (Path(args.out) / f"{args.child}.json").write_text(json.dumps(result, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/rm_hh.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/bench_rm")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--trl-defaults", action="store_true", help="TRL with its own bf16 / checkpointing defaults")
    parser.add_argument("--child", choices=["trl", "rlpost"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in ("rlpost", "trl"):
        start = time.time()
        cmd = [sys.executable, __file__, args.config, "--steps", str(args.steps), "--out", str(out), "--child", name,
               *[x for o in args.overrides for x in ("--set", o)], *(["--trl-defaults"] if args.trl_defaults else [])]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[name] = {**json.loads((out / f"{name}.json").read_text()), "wall_s": time.time() - start}
    print(f"{args.config}, {args.steps} steps x {results['rlpost'].get('pairs')} held-out pairs")
    print("| trainer | held-out accuracy | ties | s / step | peak RSS GiB | whole process s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['accuracy']:.3f} | {r['ties']:.2f} | {r['s_per_step']:.2f} | {r['peak_rss_gib']:.2f} | {r['wall_s']:.0f} |")
    (out / "table.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

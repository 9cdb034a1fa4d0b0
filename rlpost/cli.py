"""`rlpost train | eval | eval-rm | export | plot`. Argument parsing and error reporting only; the work is elsewhere.

User errors (bad config, missing file, not a checkpoint) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from rollout.types import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlpost", description="RL post-training of LLMs (GRPO on DeepSpeed).")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment carries the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training recipe")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.max_steps=5 (repeatable)")
    train.add_argument("--resume", metavar="PATH", help="checkpoint dir, its `latest` link, or a run dir")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    ev = sub.add_parser("eval", help="held-out accuracy of a checkpoint (greedy and pass@k)")
    ev.add_argument("config")
    ev.add_argument("--checkpoint", required=True, metavar="PATH",
                    help="rlpost checkpoint (step dir, `latest`, run dir) or a model spec")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rm = sub.add_parser("eval-rm", help="evaluate a reward model (rlpost eval-rm --help)", add_help=False)
    rm.add_argument("args", nargs=argparse.REMAINDER)
    export = sub.add_parser("export", help="a checkpoint as a plain HF model folder (LoRA: the adapter merged in)")
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="rlpost checkpoint (step dir, `latest`, run dir)")
    export.add_argument("--merge", required=True, metavar="OUT",
                        help="write the merged model (W + scale * B A in every adapted module) and its tokenizer here")
    plot = sub.add_parser("plot", help="PNG curves of a run's metrics")
    plot.add_argument("run_dir")
    return parser


def _quiet() -> None:
    """Library chatter (deprecation warnings, per-tensor progress bars) buries our own output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # retry chatter of an unreachable hub


def _cmd_train(args) -> int:
    from rlpost.config import load_config
    from rlpost.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume, show_progress=not args.no_progress)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    from rollout.types import world
    if world()[0] != 0:
        return
    before, after = summary.get("eval_before"), summary.get("eval_after")
    print("\n== rlpost summary ==")
    what = "pairwise accuracy" if "num_pairs" in (after or before or {}) else "accuracy"
    if before:
        size = f"{int(before['num_pairs'])} pairs" if "num_pairs" in before else f"{int(before['num_prompts'])} prompts, greedy"
        print(f"held-out {what} before: {before['accuracy']:.3f}  ({size})")
    if after:
        print(f"held-out {what} after:  {after['accuracy']:.3f}")
    print(f"training wall time: {summary.get('train_wall_s', 0.0):.0f} s")
    if summary.get("skipped_rows"):
        print(f"malformed data rows skipped: {summary['skipped_rows']}")
    if summary.get("truncated_rows"):
        print(f"rows cut to data.max_prompt_tokens / max_response_tokens: {summary['truncated_rows']}")
    if summary.get("prompts_too_long"):
        print(f"prompts over data.max_prompt_tokens skipped: {summary['prompts_too_long']}")
    print(f"checkpoint: {summary.get('checkpoint')}")


def _cmd_eval(args) -> int:
    from pathlib import Path

    from rlpost.build import load_data, make_evaluator, make_verifier, model_head
    from rlpost.checkpoint import resolve_checkpoint
    from rlpost.config import load_config
    from rollout.engine import make_engine
    from rollout.models import SPECS, is_model_folder, load_classifier, load_model, load_tokenizer

    cfg = load_config(args.config, args.overrides)
    path = Path(args.checkpoint)
    is_hf_folder = is_model_folder(path)  # a model or an adapter
    looks_like_path = args.checkpoint.startswith((".", "/", "~")) or args.checkpoint.count("/") != 1
    if not path.exists() and looks_like_path and args.checkpoint not in SPECS:
        raise UserError(f"--checkpoint {args.checkpoint}: no such checkpoint (a step dir, `latest`, a run dir, an HF "
                        f"model folder or a model spec)")
    model_path = str(resolve_checkpoint(path) / "hf") if path.exists() and not is_hf_folder else args.checkpoint
    tokenizer = load_tokenizer(model_path)
    data = load_data(cfg, tokenizer)
    verifier = make_verifier(cfg, data) if cfg.eval.kind == "accuracy" else None
    # the checkpoint generates (accuracy) or is ranked against the config's reference model (pairwise)
    pairwise = cfg.eval.kind == "pairwise"
    engine = None if pairwise else make_engine(cfg.rollout.engine, model_path, tokenizer,
                                               max_batch_size=cfg.rollout.max_batch_size,
                                               **cfg.vllm_options(data.test_prompts.longest() if data.test_prompts else None))
    load = (lambda p: load_classifier(p)[0]) if model_head(cfg) == "score" else load_model  # a reward model
    policy = load(model_path).eval() if pairwise else None
    result = make_evaluator(cfg, engine, data, verifier, policy, "cpu", tokenizer.pad_token_id)()
    if verifier is not None:
        verifier.close()
    print(json.dumps({"checkpoint": model_path, **result}, indent=2))
    return 0


def _cmd_export(args) -> int:
    """hf/ of a checkpoint as a plain HF folder: a LoRA adapter merged into its base, a full model copied."""
    import shutil
    from pathlib import Path

    from rlpost.checkpoint import resolve_checkpoint
    from rollout.models import export_merged, is_adapter

    hf = resolve_checkpoint(Path(args.checkpoint)) / "hf"
    out = Path(args.merge)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--merge {out}: the folder exists and is not empty")
    if is_adapter(hf):
        export_merged(str(hf), out)
    else:  # full fine-tuning: hf/ is a plain model folder already
        shutil.copytree(hf, out, dirs_exist_ok=True)
    print(out)
    return 0


def _cmd_plot(args) -> int:
    from rlpost.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval-rm"]:  # its own parser and error lines (rlpost/eval_rm.py)
        _quiet()
        from rlpost.eval_rm import main as eval_rm
        return eval_rm(argv[1:])
    args = _parser().parse_args(argv)  # argparse itself exits 2 on misuse
    _quiet()
    commands = {"train": _cmd_train, "eval": _cmd_eval, "export": _cmd_export, "plot": _cmd_plot}
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"rlpost {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from rlpost.rundir import RunError
        if not isinstance(e, RunError):
            raise
        print(f"rlpost {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rlpost: interrupted (the last complete checkpoint is intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

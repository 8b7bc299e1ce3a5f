"""The ``laperm`` command: train, verify, and list what is available.

Every user error ends in one line ``laperm: error: ...`` and a non-zero exit,
never a traceback (set ``LAPERM_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TRAIN_EXAMPLES = """\
examples:
  laperm train                                  # LaPerm on the bundled MNIST (lenet300), ~2 min on 2 cores
  laperm train --preset f1                      # the paper's F1 row: single shared value, 40% pruned
  laperm train --preset conv7 --epochs 15       # a preset with a reduced budget
  laperm train --model lenet300 --optimizer adam --epochs 5      # plain Adam baseline
  laperm train --model lenet300 --init pruned:0.7 --k 250         # sparse init, reconnecting
  laperm train --preset conv2 --data-dir ~/data/cifar10           # CIFAR-10 (tarball, folder or zip)
  laperm train --config my-run.yaml --seed 3    # a config file; flags override it
  laperm train --resume runs/lenet300-laperm-seed0-1a2b3c4d      # continue an interrupted run
  laperm train --resume runs/lenet300-laperm-seed0-1a2b3c4d --lr 1e-4   # ... after a NaN, more gently
"""


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--preset", help="a paper setup (see `laperm presets`); flags override it")
    g.add_argument("--config", type=Path, help="YAML or TOML file of config fields; flags override it")
    g.add_argument("--model", help="model name (see `laperm models`); default lenet300")
    g.add_argument("--dataset", help="mnist, fashion-mnist, idx, cifar10, synthetic, synthetic-cifar, text "
                                     "(default: the model's)")
    g.add_argument("--data-dir", help="dataset location (IDX folder; CIFAR-10 tarball, folder or zip; for text a "
                                      "UTF-8 file or folder, default: the Python reference bundled with Python)")
    g.add_argument("--init", help="he-uniform | pruned:P | shared:V:KEEP[,KEEP..] (e.g. shared:0.08:0.6)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["laperm", "adam", "sgd"], help="laperm (default) or a plain baseline")
    g.add_argument("--inner", choices=["adam", "adamw", "sgd"], help="LaPerm's inner optimizer (default adam)")
    g.add_argument("--k", type=int, help="sync period in steps (default 100)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="base learning rate")
    g.add_argument("--lr-schedule", help="constant | exp:G | step:E:G | milestones:E=F,...")
    g.add_argument("--l2", type=float, help="coupled L2 coefficient (default: the paper's for the model)")
    g.add_argument("--loss-scale", choices=["mean", "sum"], help="sum reproduces the reference's gradient scale")
    g.add_argument("--logit-scale", type=float, metavar="T",
                   help="train on cross-entropy of T*logits (default 1); evaluation uses the plain logits")
    g.add_argument("--granularity", choices=["row", "tensor"], help="unit of permutation")
    g.add_argument("--sync-rule", metavar="{overwrite,latent}",
                   help="overwrite (default, the paper's: a sync overwrites the inner weights) or latent "
                        "(the inner weights are kept apart and the model always runs on their synced permutation)")
    g.add_argument("--permute-biases", action=argparse.BooleanOptionalAction, default=None,
                   help="permute biases too (default: as the paper does for the model)")
    g.add_argument("--augment", help="none, mnist-paper, cifar-paper, cifar-resnet")
    g.add_argument("--bn-recalibrate", type=int, metavar="BATCHES",
                   help="recompute BatchNorm statistics on this many batches after each sync used for evaluation")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int)
    g.add_argument("--val-size", type=int, help="validation images held out of the training set (default 5000)")
    g.add_argument("--train-subset", type=int, help="train on a seeded random sample of this many images (reduced budgets)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--out", help="parent folder of run folders (default runs)")
    g.add_argument("--name", help="run folder name (default: derived from the config)")
    g.add_argument("--eval-every", type=int, metavar="EPOCHS")
    g.add_argument("--eval-steps", type=int, metavar="STEPS",
                   help="also evaluate (at a synced state) every STEPS steps, as the reference does with k")
    g.add_argument("--checkpoint-every", type=int, metavar="EPOCHS", help="checkpoint every N epochs (default 1)")
    g.add_argument("--checkpoint-steps", type=int, metavar="STEPS",
                   help="also checkpoint every N steps, so a crash in a long epoch loses little")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel processes on this machine (DDP via torchrun; gloo on CPU, NCCL on GPU); "
                        "the global batch stays --batch-size")
    g.add_argument("--no-check-replicas", dest="check_replicas", action="store_false", default=None,
                   help="distributed: skip comparing the ranks' weights after each sync")
    g.add_argument("--resume", metavar="RUN_DIR", type=Path,
                   help="continue an interrupted run folder from its last good checkpoint (bit-identical on CPU); "
                        "only --lr, --epochs and where/how to run may change")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")


FLAG_FIELDS = ("preset", "model", "dataset", "data_dir", "init", "optimizer", "inner", "k", "epochs",
               "batch_size", "lr", "lr_schedule", "l2", "loss_scale", "logit_scale", "granularity", "sync_rule",
               "permute_biases", "augment", "bn_recalibrate", "seed", "val_size", "train_subset", "device", "threads",
               "out", "name", "eval_every", "checkpoint_every", "checkpoint_steps", "nproc", "check_replicas",
               "eval_steps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laperm",
        description="Train neural networks by reconnecting their weights (Lookahead Permutation).",
        epilog="Run `laperm COMMAND --help` for each command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="train a model (default: LaPerm on the bundled MNIST)",
                       description="Train a model with LaPerm or a baseline and write a run folder.",
                       epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_flags(p)
    p = sub.add_parser("verify", help="check that a run's weights are permutations of its initial weights",
                       description="Check final.pt and best.pt of a run folder against its init.pt, row by row.",
                       epilog="example:\n  laperm verify runs/lenet300-laperm-seed0-1a2b3c4d",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    sub.add_parser("presets", help="list the paper's setups", description="List the --preset names.",
                   epilog="example:\n  laperm presets && laperm train --preset f1",
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_parser("models", help="list the models", description="List the --model names.",
                   epilog="example:\n  laperm models && laperm train --model conv7 --epochs 5",
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    for module in EXTENSIONS:
        # Each extension adds its own subcommands: register(sub) -> {name: handler}.
        COMMANDS.update(importlib.import_module(module).register(sub))
    return parser


# Modules that contribute subcommands (kept apart so the core CLI stays small).
EXTENSIONS = ("laperm.experiments.cli", "laperm.export")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, TrainConfig, load_config_file, override_config, resolve_config
    from .rundir import MARKER, RunDirError, read_run_config
    from .train import train

    flags = {f: getattr(args, f) for f in FLAG_FIELDS}
    if args.no_progress:
        flags["progress"] = False
    file_layer = load_config_file(args.config) if args.config else None
    if args.resume is not None:
        if args.overwrite:
            raise RunDirError("choose either --resume or --overwrite, not both")
        run_dir = args.resume if args.resume.name not in ("", ".", "..") else args.resume.resolve()
        flags.update(out=str(run_dir.parent), name=run_dir.name)
        saved = read_run_config(run_dir)
        try:
            TrainConfig(**saved).validate()
        except ConfigError as e:
            raise RunDirError(f"{run_dir / MARKER} is damaged ({e}); restore it or start a new run") from None
        # The saved config, with only what was given now on top (train() refuses result-changing edits).
        cfg = override_config(saved, file_layer, flags)
    else:
        cfg = resolve_config(file_layer, flags)
    from .distributed import launched_by_torchrun

    if cfg.nproc > 1 and not launched_by_torchrun():
        return launch_local(cfg.nproc, cfg.threads, args.argv)
    t0 = time.perf_counter()
    summary = train(cfg, resume=args.resume is not None, overwrite=args.overwrite)
    if _rank() == 0:
        print_summary(summary, time.perf_counter() - t0)
    return 0


def launch_local(nproc: int, threads: int | None, argv: list[str]) -> int:
    """Run this same command in ``nproc`` processes with torchrun's launcher (one machine)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Share the cores out instead of letting every process use all of them.
    per_proc = threads or max(1, (os.cpu_count() or 1) // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(per_proc))
    # The workers' arguments travel in the environment: torchrun's own parser would
    # otherwise take flags such as --nproc for abbreviations of its options.
    os.environ[WORKER_ARGV] = json.dumps(argv)
    launcher = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                           "-m", "laperm.cli", WORKER_COMMAND])
    try:
        run(launcher)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r} (exit {f.exitcode})" for r, f in sorted(e.failures.items()))
        print(f"laperm: error: distributed training failed: {failures}; see the messages above", file=sys.stderr)
        return 2
    return 0


WORKER_COMMAND, WORKER_ARGV = "distributed-worker", "LAPERM_WORKER_ARGV"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def print_summary(s: dict[str, Any], wall: float) -> None:
    print()
    line = f"test accuracy {s['final_test_acc']:.2%} (final synced model)"
    if s.get("selected_test_acc") is not None:
        line += f", {s['selected_test_acc']:.2%} (selected on validation, epoch {s['selected_epoch']})"
    print(f"{s['model']} on {s['dataset']} with {s['optimizer']}: {line}")
    print(f"best test accuracy over the run {s['best_test_acc']:.2%} (the paper's protocol; not a selection rule)")
    if s.get("final_test_bpc") is not None:  # a language model (accuracy above: next-character accuracy)
        val = f"validation {s['final_val_bpc']:.3f}, " if s.get("final_val_bpc") is not None else ""
        print(f"bits per character (final synced model): {val}test {s['final_test_bpc']:.3f}")
    m, sec = divmod(int(round(wall)), 60)
    print(f"time {m}m {sec:02d}s ({s['train_time_s']:.0f}s training) on {s['device']}; run folder {s['run_dir']}")
    if s.get("verified"):
        print(s["verified"])


def cmd_verify(args: argparse.Namespace) -> int:
    from .rundir import verify_run

    report = verify_run(args.run_dir)
    print(report.message())
    return 0 if report.ok else 1


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import PRESET_NOTES, PRESETS

    for name, values in PRESETS.items():
        print(f"{name:14s} {PRESET_NOTES[name]}")
        print(f"{'':14s} " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import MODELS

    for name, spec in MODELS.items():
        print(f"{name:10s} {spec.dataset:8s} {spec.description}")
    return 0


COMMANDS = {"train": cmd_train, "verify": cmd_verify, "presets": cmd_presets, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # `laperm` alone runs the main job
    elif argv == [WORKER_COMMAND] and WORKER_ARGV in os.environ:
        argv = json.loads(os.environ[WORKER_ARGV])  # a process started by launch_local
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # e.g. `laperm presets | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("laperm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - turned into one clear line below
        if os.environ.get("LAPERM_DEBUG"):
            raise
        code, message = _explain(e)
        message = " ".join(str(message).splitlines())  # always one line, whatever the exception said
        rank = f" [rank {_rank()}]" if _rank() else ""
        print(f"laperm: error:{rank} {message}", file=sys.stderr)
        return code


def _explain(e: Exception) -> tuple[int, str]:
    """Map an exception to (exit code, one-line message)."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .distributed import DivergenceError
    from .models import UnknownModelError
    from .optim import LaPermError
    from .rundir import RunDirError
    from .train import NumericalError, TrainingInterrupted

    if isinstance(e, TrainingInterrupted):
        return 3, str(e)
    if isinstance(e, (ConfigError, DataError, RunDirError, CheckpointError, UnknownModelError, LaPermError,
                      NumericalError, DivergenceError)):
        return 2, str(e)
    if type(e).__module__.startswith("torch.distributed") or type(e).__name__.startswith("Dist"):
        return 2, (f"distributed communication failed ({type(e).__name__}): another process probably died "
                   "or timed out; see its messages above")
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return 2, f"file system error{where}: {e.strerror or e}; check free space and permissions of --out"
    return 1, f"unexpected {type(e).__name__}: {e} (set LAPERM_DEBUG=1 for a traceback and please report it)"


if __name__ == "__main__":
    sys.exit(main())

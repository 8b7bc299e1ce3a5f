"""The ``laperm`` command: train, verify, and list what is available.

Every user error ends in one line ``laperm: error: ...`` and a non-zero exit,
never a traceback (set ``LAPERM_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

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
    """The flags of ``laperm train``: one per config field that has one (from the field's metadata),
    plus --config, --resume and --overwrite."""
    import typing

    from .config import OPTIMISATION, RUN, WHAT, TrainConfig, flag_fields, flag_name

    groups = {name: p.add_argument_group(name) for name in (WHAT, OPTIMISATION, RUN)}
    groups[WHAT].add_argument("--config", type=Path, help="YAML or TOML file of config fields; flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in flag_fields():
        meta, flag = f.metadata, flag_name(f)
        assert flag is not None  # flag_fields() has only fields with a flag
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"] or None}
        if f.name == "optimizer":  # a comma list trains a stack: --optimizer laperm,adam
            kwargs.update(type=_optimizer_list(meta["choices"]), metavar="{" + ",".join(meta["choices"]) + "}[,...]")
        elif meta["choices"]:
            kwargs["choices"] = list(meta["choices"])
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        kind = hints[f.name]
        if kind is bool and f.default is True:  # --no-FIELD turns it off
            kwargs.update(action="store_false", default=None)
        elif kind is bool:  # --FIELD turns it on
            kwargs.update(action="store_true", default=None)
        elif kind == bool | None:
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        else:
            base = next((t for t in (int, float) if kind in (t, t | None)), None)
            if base is not None:
                kwargs["type"] = base
        groups[meta["group"]].add_argument(flag, **kwargs)
    groups[WHAT].add_argument(
        "--seeds",
        metavar="SEEDS",
        help="train these seeds (e.g. 0-7 or 0,3,5; with a list of --optimizer, each) as one stacked model "
        "in one process, one run folder each",
    )
    g = groups[RUN]
    g.add_argument(
        "--tensorboard",
        nargs="?",
        const="",
        metavar="DIR",
        help="log metrics, lr, reconnected fraction and per-layer weight movement at each sync to "
        "TensorBoard (default DIR: RUN_DIR/tensorboard; needs the tensorboard package)",
    )
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        type=Path,
        help="continue an interrupted run folder from its last good checkpoint (bit-identical on CPU); "
        "only --lr, --epochs and where/how to run may change",
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")


def _optimizer_list(choices: tuple[str, ...]) -> Any:
    """``--optimizer``'s type: one of ``choices``, or a comma list of them (a stack)."""

    def parse(text: str) -> str:
        for name in text.split(","):
            if name not in choices:
                raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(choices)})")
        return text

    return parse


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose error is one line whatever the argument it quotes holds (a newline, say)."""

    def error(self, message: str) -> NoReturn:
        super().error(" ".join(message.splitlines()))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="laperm",
        description="Train neural networks by reconnecting their weights (Lookahead Permutation).",
        epilog="Run `laperm COMMAND --help` for each command's options and examples.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"laperm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "train",
        help="train a model (default: LaPerm on the bundled MNIST)",
        description="Train a model with LaPerm or a baseline and write a run folder.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_flags(p)
    p = sub.add_parser(
        "verify",
        help="check that a run's weights are permutations of its initial weights",
        description="Check final.pt and best.pt of a run folder against its init.pt, row by row.",
        epilog="example:\n  laperm verify runs/lenet300-laperm-seed0-1a2b3c4d",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", type=Path)
    sub.add_parser(
        "presets",
        help="list the paper's setups",
        description="List the --preset names.",
        epilog="example:\n  laperm presets && laperm train --preset f1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_parser(
        "models",
        help="list the models",
        description="List the --model names.",
        epilog="example:\n  laperm models && laperm train --model conv7 --epochs 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_export_command(sub)
    _add_pack_commands(sub)
    from .experiments.cli import register

    COMMANDS.update(register(sub))  # the experiments' own subcommands: register(sub) -> {name: handler}
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, TrainConfig, flag_fields, load_config_file, override_config, resolve_config
    from .engine import train
    from .rundir import MARKER, RunDirError, read_run_config

    flags = {f.name: getattr(args, f.name) for f in flag_fields()}
    file_layer = load_config_file(args.config) if args.config else None
    stacked = _train_stack(args, flags, file_layer)
    if stacked is not None:
        return stacked
    if args.resume is not None:
        if args.overwrite:
            raise RunDirError("choose either --resume or --overwrite, not both")
        run_dir = args.resume if args.resume.name not in ("", ".", "..") else args.resume.resolve()
        flags.update(out=str(run_dir.parent), name=run_dir.name)
        saved = read_run_config(run_dir)
        saved.pop("stop_at", None)  # the deadline of the command that stopped the run, not of this one
        try:
            TrainConfig(**saved).validate()
        except ConfigError as e:
            raise RunDirError(f"{run_dir / MARKER} is damaged ({e}); restore it or start a new run") from None
        # The saved config, with only what was given now on top (train() refuses result-changing edits).
        cfg = override_config(saved, file_layer, flags)
        _announce_resume_nproc(run_dir, saved.get("nproc", 1), args.nproc)
    else:
        cfg = resolve_config(file_layer, flags)
    if cfg.mode == "auto":  # decided now (as train() would): the run's name depends on it
        from .build import resolve_device, resolve_mode

        cfg = resolve_mode(cfg, resolve_device(cfg.device))
    from .distributed import launched_by_torchrun

    if cfg.nproc > 1 and not launched_by_torchrun():
        return launch_local(cfg.nproc, cfg.threads, args.argv, Path(cfg.out) / cfg.run_name())
    t0 = time.perf_counter()
    callbacks = _tensorboard(args.tensorboard, cfg) if args.tensorboard is not None else None
    try:
        summary = train(cfg, resume=args.resume is not None, overwrite=args.overwrite, callbacks=callbacks)
    finally:
        if callbacks is not None:
            callbacks.close()
    if _rank() == 0:
        print_summary(summary, time.perf_counter() - t0)
    return 0


def _train_stack(args: argparse.Namespace, flags: dict[str, Any], file_layer: Any) -> int | None:
    """``--seeds``, a list of ``--optimizer``s, or ``--resume`` of a stack's member: train the stack
    (engine.stack_session), print each member's summary; None when this is a single run."""
    from .config import override_config, resolve_config
    from .engine.stack_session import parse_seeds, plan_stack, resume_configs, train_stack

    t0 = time.perf_counter()
    if args.resume is not None:
        if args.overwrite:
            return None  # (cmd_train refuses the pair)
        run_dir = args.resume if args.resume.name not in ("", ".", "..") else args.resume.resolve()
        cfgs = resume_configs(
            run_dir,
            lambda saved, name: override_config(saved, file_layer, {**flags, "out": str(run_dir.parent), "name": name}),
        )
        if cfgs is None:
            return None
    else:
        optimizers = flags["optimizer"].split(",") if flags["optimizer"] else None
        if args.seeds is None and (optimizers is None or len(optimizers) == 1):
            return None
        base = resolve_config(file_layer, {**flags, "optimizer": optimizers[0] if optimizers else None})
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        cfgs = plan_stack(base, seeds, optimizers or [base.optimizer])
    if args.tensorboard is not None:
        from .config import ConfigError

        raise ConfigError("--tensorboard does not log stacked runs yet; train the runs alone to use it")
    summaries = train_stack(cfgs, resume=args.resume is not None, overwrite=args.overwrite)
    for s in summaries:
        print_summary(s, time.perf_counter() - t0)
    if len(summaries) < len(cfgs):
        print(f"{len(cfgs) - len(summaries)} of the {len(cfgs)} stacked runs stopped early (see above)")
        return 1
    return 0


def _tensorboard(log_dir: str, cfg: Any) -> Any:
    """The TensorBoard logger of ``laperm train --tensorboard [DIR]`` (not a config field: it changes no result)."""
    from importlib.util import find_spec

    from .config import ConfigError

    if find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'laperm[integrations]'")
    from .integrations.tensorboard import TensorBoardCallbacks
    from .rundir import check_can_create

    if log_dir:  # (the default, RUN_DIR/tensorboard, is checked with the run folder)
        check_can_create(Path(log_dir), "the --tensorboard folder")
    return TensorBoardCallbacks(log_dir or Path(cfg.out) / cfg.run_name() / "tensorboard")


def _announce_resume_nproc(run_dir: Path, saved: int, requested: int | None) -> None:
    """Resume with the run's own process count (a different --nproc is refused), and say so once."""
    from .distributed import launched_by_torchrun
    from .launch import resume_process_count

    nproc = resume_process_count(run_dir, saved, requested)
    if nproc > 1 and requested is None and not launched_by_torchrun():
        print(f"resuming {run_dir} with {nproc} processes, as it ran (--nproc {nproc})", flush=True)


def launch_local(nproc: int, threads: int | None, argv: list[str], run_dir: Path | None = None) -> int:
    """Run this same command in ``nproc`` processes with torchrun's launcher (one machine).

    The workers exit if this process dies, however it dies (see :mod:`laperm.launch`).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from .launch import failure_line, mark_launcher, quiet_launcher_logs

    # Share the cores out instead of letting every process use all of them.
    per_proc = threads or max(1, (os.cpu_count() or 1) // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(per_proc))
    # The workers' arguments travel in the environment: torchrun's own parser would
    # otherwise take flags such as --nproc for abbreviations of its options.
    os.environ[WORKER_ARGV] = json.dumps(argv)
    mark_launcher()
    launcher = parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "laperm.cli", WORKER_COMMAND]
    )
    quiet_launcher_logs()
    try:
        run(launcher)
    except ChildFailedError as e:
        exitcodes = {r: f.exitcode for r, f in e.failures.items()}
        print(f"laperm: error: {failure_line(exitcodes, run_dir)}", file=sys.stderr)
        return 2
    except SignalException:  # SIGTERM/SIGINT: torchrun passed it on, the workers saved a checkpoint and said so
        return 3
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
    from .verify import verify_run

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


EXPORT_EXAMPLES = """\
examples:
  laperm export runs/f2-laperm-seed0-1a2b3c4d               # writes .../final.laperm
  laperm export runs/conv7-laperm-seed0-1a2b3c4d -o conv7.laperm --check
  laperm verify conv7.laperm                                # a compact file verifies like a run folder

Python: laperm.export.load_compact("conv7.laperm") returns the model's state_dict, bit-exact.
"""


def cmd_export(args: argparse.Namespace) -> int:
    from .export import check_against_run, export_run

    res = export_run(args.run_dir, args.output, which=args.which, with_theta0=args.with_theta0)
    widths = sorted({b for b, _ in res.bits.values()})
    span = f"{widths[0]}" if len(widths) == 1 else f"{widths[0]}-{widths[-1]}"
    print(
        f"wrote {res.path}: {res.nbytes:,} bytes = {res.ratio:.4f} x the float32 state_dict "
        f"({res.state_dict_nbytes:,} bytes); {res.permuted_weights:,} permuted weights at {span} bits "
        f"(mean {res.mean_bits:.2f}), θ0 {'stored' if args.with_theta0 else 'rebuilt from the seed'}"
    )
    if args.check:
        bad = check_against_run(res.path, args.run_dir, args.which)
        if bad:
            print(f"check FAILED: {', '.join(bad)} differ from {args.which}.pt", file=sys.stderr)
            return 1
        print(f"checked: {res.path} reloads bit-exactly to {args.which}.pt")
    return 0


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    SUFFIX = ".laperm"  # laperm.export.SUFFIX (not imported: the parser is built without torch)
    p = sub.add_parser(
        "export",
        help="write a compact checkpoint: the θ0 recipe plus per-row permutations",
        description="Store a LaPerm-trained network as its initial-weight recipe (model, init, seed)\n"
        "plus, per permuted row, bit-packed indices of its initial values (1 bit per weight\n"
        "for shared-value rows). Reloads bit-exactly with laperm.export.load_compact.",
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, help="a finished LaPerm run folder")
    p.add_argument("-o", "--output", type=Path, help=f"output file (default RUN_DIR/final{SUFFIX}, or best{SUFFIX})")
    p.add_argument("--which", choices=["final", "best"], default="final", help="which weights (default final)")
    p.add_argument(
        "--with-theta0",
        action="store_true",
        help="store the initial weights too (bigger; for when the seed cannot rebuild them)",
    )
    p.add_argument(
        "--check", action="store_true", help="reload the written file and compare it bit for bit with the run's weights"
    )
    COMMANDS["export"] = cmd_export


def cmd_pack(args: argparse.Namespace) -> int:
    from .pack import pack_runs

    plan = pack_runs(args.paths, args.out, args.max_file_mib, args.max_total_mib)
    for r in plan["runs"]:
        if not r["packed"]:
            print(f"laperm: warning: {r['path']} waits: {r['reason']}", file=sys.stderr)
    print(plan["totals"]["summary"])
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from .pack import unpack

    result = unpack(args.dir, args.into, force=args.force)
    kept = (
        f"; kept {len(result['kept'])} newer or complete file(s)/run(s): {', '.join(result['kept'])}"
        if result["kept"]
        else ""
    )
    print(f"unpacked {len(result['restored'])} run(s) into {args.into}{kept}")
    return 0


def _mib(text: str) -> float:
    """A size limit in MiB: a positive, finite number (inf or nan cannot size a file)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of MiB: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of MiB, got {text!r}")
    return value


def _add_pack_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="pack run folders (finished or not) into a few files to continue them elsewhere",
        description="Write everything needed to continue each run elsewhere, in few bytes: configs, metrics,\n"
        "summaries, the checkpoint to resume (θ0 rebuilt from its recipe, synced weights as\n"
        "permutation indices, optimizer moments and random states exact), plus plan.json/plan.md.",
        epilog="examples:\n  laperm pack results/paper --out /tmp/pack --max-total-mib 60\n"
        "  laperm unpack /tmp/pack --into work && laperm train --resume work/paper/<run>",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a run folder, or a folder holding run folders")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the pack folder to write")
    p.add_argument("--max-file-mib", type=_mib, default=16, metavar="MIB", help="largest data file (default 16)")
    p.add_argument("--max-total-mib", type=_mib, metavar="MIB", help="all files together; runs that do not fit wait")
    p = sub.add_parser(
        "unpack",
        help="restore run folders from `laperm pack`",
        description="Restore packed run folders at their recorded paths; `laperm train --resume` continues them.",
        epilog="example:\n  laperm unpack /tmp/pack --into work",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="the --out folder of `laperm pack`")
    p.add_argument("--into", type=Path, default=Path("."), metavar="ROOT", help="where to restore (default: here)")
    p.add_argument("--force", action="store_true", help="replace run folders even when they are newer")
    COMMANDS.update(pack=cmd_pack, unpack=cmd_unpack)


COMMANDS = {"train": cmd_train, "verify": cmd_verify, "presets": cmd_presets, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _is_worker(argv):
        from .launch import guard_worker

        guard_worker()  # first of all: never outlive the launcher (e.g. after a kill -9 of its group)
        argv = json.loads(os.environ[WORKER_ARGV])
    parser = build_parser()
    if not argv:
        argv = ["train"]  # `laperm` alone runs the main job
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
        if code == PEER_LOST_EXIT:
            if _under_laperm_launcher():
                return code  # the launcher names the process that failed first, in one line for the whole job
            code = 2
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
    from .engine.errors import DeviceUnusable, NumericalError, TrainingInterrupted
    from .models import UnknownModelError
    from .optim import LaPermError
    from .rundir import RunDirError

    if isinstance(e, TrainingInterrupted | DeviceUnusable):  # stopped at a checkpoint: the message says how to resume
        return 3, str(e)
    if isinstance(
        e,
        (
            ConfigError,
            DataError,
            RunDirError,
            CheckpointError,
            UnknownModelError,
            LaPermError,
            NumericalError,
            DivergenceError,
        ),
    ):
        return 2, str(e)
    if _is_communication_error(e):
        return PEER_LOST_EXIT, (
            f"distributed communication failed ({type(e).__name__}): another process probably died "
            "or timed out; see its messages above"
        )
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return 2, f"file system error{where}: {e.strerror or e}; check free space and permissions of --out"
    return 1, f"unexpected {type(e).__name__}: {e} (set LAPERM_DEBUG=1 for a traceback and please report it)"


PEER_LOST_EXIT = 4  # = laperm.launch.PEER_LOST_EXIT (not imported here: this module loads before torch)


def _is_communication_error(e: Exception) -> bool:
    """torch.distributed's errors, and the plain RuntimeErrors gloo raises when a peer's connection drops."""
    if type(e).__module__.startswith("torch.distributed") or type(e).__name__.startswith("Dist"):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("gloo" in text or "NCCL" in text)


def _under_laperm_launcher() -> bool:
    """True in a worker whose parent is a live ``laperm train --nproc`` launcher (it reports failures)."""
    from .launch import LAUNCHER_PID_ENV

    return os.environ.get(LAUNCHER_PID_ENV) == str(os.getppid())


def _is_worker(argv: list[str]) -> bool:
    """This process is a ``--nproc`` worker started by :func:`launch_local`."""
    return argv == [WORKER_COMMAND] and WORKER_ARGV in os.environ


def _worker_exit(code: int | bool) -> None:
    """End a ``--nproc`` worker without the interpreter's shutdown: everything it writes is written
    and its process group destroyed by now, and skipping the C++ destructors at exit avoids the
    rare abort of a communication thread torn down there, which would fail a finished job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


if __name__ == "__main__":
    rc = main()
    if _is_worker(sys.argv[1:]):
        _worker_exit(rc)
    sys.exit(rc)

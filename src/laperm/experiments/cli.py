"""Subcommands for experiments: ``laperm run`` and ``laperm report``."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

RUN_EXAMPLES = """\
examples:
  laperm run --list                           # the experiments and what they run
  laperm run agnostic                         # F1 and F2, paper budget, seeds 0 1 2
  laperm run k --budget quick --out /tmp/r    # smoke test of the k sweep
  laperm run dense --only conv7 --threads 1   # only the runs whose tags mention conv7
  laperm run agnostic --parallel 4            # 4 runs at once (one GPU fits several small runs)
  laperm run paper --dry-run                  # every README row of the paper and its runs
  laperm run paper --deadline 480 --parallel 4  # stop every run cleanly within 8 minutes (resumable)
  laperm report                               # docs/results.md + docs/figures from results/
"""


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add this module's subcommands to ``sub``; return {command: handler}."""
    p = sub.add_parser(
        "run",
        help="run a named paper experiment (resumable)",
        description="Train the runs of a named experiment that are not finished yet.",
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experiment", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument(
        "--budget",
        choices=["quick", "paper"],
        default="paper",
        help="paper (default): the budget in the experiment's description; quick: a smoke test",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the experiment's)")
    p.add_argument("--out", default="results", help="results folder (default results)")
    p.add_argument("--only", help="only runs whose tags contain this text, e.g. model=conv7")
    p.add_argument("--threads", type=int, help="torch CPU threads per run")
    p.add_argument("--data-dir", help="dataset location (e.g. the CIFAR-10 zip)")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="train N runs at once, each a `laperm train` process logging to EXPERIMENT/logs (default 1: in turn)",
    )
    p.add_argument(
        "--stack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train runs that differ only in seed and optimizer as one stacked model, each in its own run "
        "folder (default: on for runs on a CUDA device); --no-stack trains every run alone",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    p.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help="every run stops cleanly within SECONDS (finished, or a checkpoint saved: run again to continue); "
        "started runs go first",
    )
    p.add_argument(
        "--min-start",
        type=float,
        metavar="SECONDS",
        help="with --deadline: start no run with less time left than this (default 30)",
    )
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N; on CUDA the paper runs use the fast path")
    p.add_argument("--max-runs", type=int, metavar="N", help="train at most N runs this time (unfinished ones first)")
    p.add_argument(
        "--evaluate-unfinished",
        action="store_true",
        help="train nothing; evaluate the newest checkpoint of each unfinished run (partial.json)",
    )
    p = sub.add_parser(
        "report",
        help="write docs/results.md and figures from stored results",
        description="Rebuild the results report and its figures from results/ (no training).",
        epilog="examples:\n  laperm report                       # results/ -> docs/results.md, docs/figures/\n"
        "  laperm report --results /tmp/r --docs /tmp/d",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--results", default="results", help="results folder (default results)")
    p.add_argument("--docs", default="docs", help="where results.md and figures/ go (default docs)")
    return {"run": cmd_run, "report": cmd_report}


def cmd_run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from . import suite  # noqa: F401 - registers the experiments
    from .base import EXPERIMENTS, ExperimentError

    if args.list:
        for exp in EXPERIMENTS.values():
            print(f"{exp.name:12s} v{exp.version}  {exp.description}")
        return 0
    if not args.experiment:
        raise ConfigError(f"name an experiment: one of {', '.join(EXPERIMENTS)} (laperm run --list describes them)")
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be at least 1 (runs at once), got {args.parallel}")
    if args.deadline is not None and not 0 < args.deadline < math.inf:
        raise ConfigError(f"--deadline must be a positive number of seconds, got {args.deadline:g}")
    if args.min_start is not None and not 0 <= args.min_start < math.inf:
        raise ConfigError(f"--min-start must be a number of seconds >= 0, got {args.min_start:g}")
    if args.max_runs is not None and args.max_runs < 1:
        raise ConfigError(f"--max-runs must be at least 1, got {args.max_runs}")
    if args.experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {args.experiment!r}; choose one of: {', '.join(EXPERIMENTS)}")
    try:
        entries = _run(args)
    except ExperimentError as failure:
        print(f"laperm: error: {failure}", file=sys.stderr)
        return 1
    if args.evaluate_unfinished:
        from pathlib import Path

        from .partial import evaluate_unfinished

        for e in entries:
            out = evaluate_unfinished(Path(args.out) / args.experiment / e["folder"], args.threads)
            if out is not None:
                print(f"{e['folder']}: epoch {out['epoch']} checkpoint, test accuracy {out['test_acc']:.2%}")
    return 0


def _run(args: argparse.Namespace) -> list[dict]:
    from .base import run_experiment

    return run_experiment(
        args.experiment,
        budget=args.budget,
        seeds=args.seeds,
        out=args.out,
        only=args.only,
        threads=args.threads,
        data_dir=args.data_dir,
        dry_run=args.dry_run or args.evaluate_unfinished,
        parallel=args.parallel,
        deadline_s=args.deadline,
        min_start_s=args.min_start,
        device=args.device,
        max_runs=args.max_runs,
        stack=args.stack,
    )


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import ConfigError
    from .report import write_report

    try:
        found = Path(args.results).is_dir()
    except OSError as e:  # (e.g. a name too long for the file system)
        raise ConfigError(f"--results {args.results!r} cannot be read ({e.strerror or e})") from None
    if not found:  # (an empty report would look like "no results")
        raise ConfigError(f"--results {args.results!r} is not a folder; give the folder `laperm run --out` wrote")
    path = write_report(args.results, args.docs)
    print(f"wrote {path}")
    return 0

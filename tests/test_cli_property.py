"""Hostile values for every flag and positional of every `laperm` subcommand: exit 0 or 2, one clear line,
never a traceback, and nothing created when the command refuses.

The subcommands and their arguments are read from the parser itself (``build_parser``), so a new
subcommand or flag is drawn from without editing this file; a subcommand without a known-good
command line here (``GOOD``) fails :func:`test_every_subcommand_is_covered`. Each example takes a
known-good, fast command line of its subcommand and replaces or adds **one** argument with a
hostile value: negative, zero, huge, NaN/inf, wrong types, empty or blank strings, text drawn by
hypothesis, paths that do not exist, a file where a folder is expected, a folder where a file is
expected, and paths that cannot be written (under ``/proc`` or below a file). ``main(argv)`` runs in
a fresh working folder holding a finished run, a pack of it and a plain file, with a time limit.

Asserted: the exit code is 0 or 2 (argparse's usage errors included); stderr holds no traceback and
no "unexpected" error, and a refusal ends in one ``laperm: error:`` line (or argparse's); when the
exit code is not 0, the working folder (and its parent) holds exactly the entries it held before.

Examples drawn per subcommand (train, run, verify, export, pack, unpack, report, presets, models):
``EXAMPLES`` = 8 in the default test set, the same examples every time (``derandomize``: a stable
time, under 30 s for all nine on 2 cores), and ``SLOW_EXAMPLES`` = 80, new ones each time, in the
test marked slow.

Kept quick and contained: commands that pass every check really run, but every training is stopped
by the test's own SIGINT at step 3 (``LAPERM_TEST_FAULT=int@step:3``; such a command exits 3 after
saving a checkpoint, accepted only when that stop fired), ``--nproc N > 1`` does not start N processes
(``launch_local`` is replaced by a stub: test_distributed.py starts real ones) and neither does
``laperm run --parallel N`` (``run_parallel`` stubbed). Paths are relative to the working folder or
under ``/proc``, so nothing can be written outside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laperm import checkpoint, cli
from laperm.cli import build_parser, main

EXAMPLES = 8
SLOW_EXAMPLES = 80
TIME_LIMIT_S = 60  # per command (a stopped training takes a second or two)
STOPPED_EXIT = 3  # the test's own stop of an accepted training (TrainingInterrupted)

TRAIN = [
    "--model", "f1", "--dataset", "synthetic", "--val-size", "64", "--train-subset", "64", "--batch-size", "32",
    "--epochs", "1", "--k", "2", "--threads", "1", "--no-progress",
]  # fmt: skip

# A known-good, fast command line per subcommand: (positional values by dest, options).
GOOD: dict[str, tuple[dict[str, list[str]], list[str]]] = {
    "train": ({}, [*TRAIN, "--out", "runs"]),
    "run": ({"experiment": ["tiny"]}, ["--out", "results", "--threads", "1", "--budget", "quick"]),
    "verify": ({"run_dir": ["run"]}, []),
    "export": ({"run_dir": ["run"]}, ["-o", "out.laperm"]),
    "pack": ({"paths": ["run"]}, ["--out", "packed"]),
    "unpack": ({"dir": ["pack"]}, ["--into", "restored"]),
    "report": ({}, ["--results", "results", "--docs", "docs"]),
    "presets": ({}, []),
    "models": ({}, []),
}

HOSTILE = [
    "-1", "0", "-0", "1", "2", "3", "7", "32", "1024", "99999999999999999999", "-99999999999999999999",
    "2.5", "-0.5", "1e-30", "1e400", "nan", "inf", "-inf", "NaN", "0x10", "1_000", "abc", "", " ", "\t",
    "-", "--", ".", "..", "none", "None", "true", "missing/nowhere", "a-file", "a-file/below", "run",
    "run/final.pt", "run/checkpoints", "pack", "/proc/laperm-nope", "/proc/laperm-nope/deeper",
    "ünïcødé", "x" * 300, "a b", "0-3", "0,1", "laperm,adam", "laperm,foo", "model=f1", "row=Nope",
]  # fmt: skip
# Drawn text: no "/" (an absolute path would write outside the working folder), no NUL (argv cannot hold one).
TEXT = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), max_size=12)


UNKNOWN = argparse.Action([], "unknown")  # stands for an argument no subcommand defines


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def takes_no_value(action: argparse.Action) -> bool:
    return action.option_strings != [] and action.nargs == 0


def values_for(draw, action: argparse.Action) -> list[str]:
    """One or more hostile values for ``action`` (its own choices too: valid values in a hostile mix)."""
    pool = st.sampled_from(HOSTILE) | TEXT
    if action.choices:
        pool = pool | st.sampled_from([str(c) for c in action.choices])
    if action.nargs in ("+", "*"):
        return draw(st.lists(pool, min_size=1, max_size=3))
    if action.nargs == "?" and draw(st.booleans()):
        return []
    return [draw(pool)]


def hostile_argv(draw, command: str, parser: argparse.ArgumentParser) -> list[str]:
    """``command``'s known-good line with one argument replaced (or added) by hostile values."""
    positionals, options = GOOD[command]
    positionals = dict(positionals)
    action = draw(st.sampled_from([*arguments(parser), UNKNOWN]))
    if action is UNKNOWN:  # an argument the command does not have
        options = options + draw(st.lists(st.sampled_from(["--bogus", "-z", *HOSTILE]) | TEXT, min_size=1, max_size=2))
    elif not action.option_strings:  # a positional: replace its value
        positionals[action.dest] = values_for(draw, action)
    else:
        options = _without(options, action)
        flag = draw(st.sampled_from(action.option_strings))
        options = options + [flag] + ([] if takes_no_value(action) else values_for(draw, action))
    ordered = [v for a in arguments(parser) if not a.option_strings for v in positionals.get(a.dest, [])]
    return [command, *ordered, *options]


def _without(options: list[str], action: argparse.Action) -> list[str]:
    """``options`` less ``action``'s flag and its value (the known-good lines give each flag one value)."""
    out, skip = [], False
    for item in options:
        if skip:
            skip = False
        elif item in action.option_strings:
            skip = not takes_no_value(action)
        else:
            out.append(item)
    return out


# -- the working folder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A working folder's contents: a finished LaPerm run, a pack of it, a plain file, an empty results/."""
    root = tmp_path_factory.mktemp("cli-template")
    n = torch.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", *TRAIN, "--out", str(root), "--name", "run"]) == 0
        assert main(["pack", str(root / "run"), "--out", str(root / "pack")]) == 0
    torch.set_num_threads(n)
    (root / "a-file").write_text("not a folder\n")
    (root / "results").mkdir()
    return root


@pytest.fixture
def stubs(monkeypatch, tmp_path):
    """No real processes, a tiny experiment for `laperm run`, every training stopped at step 3."""
    from laperm.experiments import base, parallel
    from laperm.experiments.base import Experiment, Run

    common = dict(model="f1", dataset="synthetic", epochs=1, val_size=64, train_subset=64, batch_size=32, k=2)
    tiny = Experiment("tiny", 1, "test", lambda budget, seeds: [Run(dict(common, seed=s), {"seed": s}) for s in seeds])
    monkeypatch.setitem(base.EXPERIMENTS, "tiny", tiny)
    monkeypatch.setattr(cli, "launch_local", lambda nproc, threads, argv, run_dir=None: 0)
    monkeypatch.setattr(parallel, "run_parallel", lambda commands, n, **kw: [0] * len(commands))
    log = tmp_path / "faults.log"
    monkeypatch.setenv(checkpoint.FAULT_ENV, "int@step:3")
    monkeypatch.setenv(checkpoint.FAULT_LOG_ENV, str(log))
    for name in ("LAPERM_DEBUG", "LAPERM_CIFAR10"):
        monkeypatch.delenv(name, raising=False)
    return log


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_in_box(template: Path, argv: list[str], fault_log: Path) -> tuple[int, str, set[str], set[str], bool]:
    """``main(argv)`` in a fresh copy of ``template``; (exit code, stderr, entries before, after, stopped)."""
    box = Path(tempfile.mkdtemp(prefix="laperm-cli-"))
    work = box / "work"
    shutil.copytree(template, work)
    before = listing(box)
    cwd, threads, err = os.getcwd(), torch.get_num_threads(), io.StringIO()
    fault_log.unlink(missing_ok=True)
    checkpoint.reset_fault_counts()
    try:
        os.chdir(work)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), time_limit(TIME_LIMIT_S):
            try:
                rc = main(list(argv))
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 2
        return rc, err.getvalue(), before, listing(box), fault_log.exists()
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        shutil.rmtree(box, ignore_errors=True)


def check(template: Path, argv: list[str], fault_log: Path) -> None:
    rc, err, before, after, stopped = run_in_box(template, argv, fault_log)
    said = f"laperm {' '.join(map(repr, argv))} -> exit {rc}: {err.strip()[-800:]}"
    assert "Traceback" not in err and "laperm: error: unexpected" not in err, said
    assert rc in (0, 2) or (rc == STOPPED_EXIT and stopped), said
    if rc == 2:
        last = err.strip().split("\n")[-1]  # (not splitlines: a drawn \x1e is no line break on a terminal)
        assert last.startswith("laperm: error:") or ": error: " in last or last.startswith("usage:"), said
    if rc not in (0, STOPPED_EXIT):
        assert after == before, f"{said}; created {sorted(after - before)[:5]}, removed {sorted(before - after)[:5]}"


COMMANDS = sorted(subcommands())


def test_every_subcommand_is_covered():
    assert set(COMMANDS) == set(GOOD), (
        f"give each subcommand a known-good command line in GOOD: {set(COMMANDS) ^ set(GOOD)}"
    )


def _property(examples: int, derandomize: bool):
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=derandomize,
    )
    @given(data=st.data())
    def body(command, template, stubs, data):
        argv = hostile_argv(data.draw, command, subcommands()[command])
        data.draw(st.just(argv), label="argv")  # (shown with a failing example)
        check(template, argv, stubs)

    return body


@pytest.mark.parametrize("command", COMMANDS)
def test_hostile_arguments_exit_cleanly(command, template, stubs):
    _property(EXAMPLES, derandomize=True)(command, template, stubs)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_hostile_arguments_exit_cleanly_many(command, template, stubs):
    _property(SLOW_EXAMPLES, derandomize=False)(command, template, stubs)


def test_the_known_good_lines_succeed(template, stubs):
    """The base of every example works as it is (else every example would test only a refusal)."""
    for command in COMMANDS:
        positionals, options = GOOD[command]
        parser = subcommands()[command]
        ordered = [v for a in arguments(parser) if not a.option_strings for v in positionals.get(a.dest, [])]
        rc, err, *_ = run_in_box(template, [command, *ordered, *options], stubs)
        assert rc == 0, (command, err)

"""Every file in examples/ runs as its docstring says: each documented command, from the repository root,
in a subprocess, as a user would type it.  An example that documents no command this test knows how to
run fails here, so that no example goes untested."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
# What each example prints once it has checked its own result (it asserts first): a line that says so.
SUCCESS = {
    "drop_in.py": "every row is a permutation",
    "fsdp2.py": "every weight row is a permutation",
    "with_accelerate.py": "bit-identical",
    "with_hf_trainer.py": "verified as a permutation",
    "with_lightning.py": "verified",
}


def documented_commands(example: Path) -> list[str]:
    """The indented lines of the example's docstring that name it (a trailing ``# comment`` dropped)."""
    doc = ast.get_docstring(ast.parse(example.read_text())) or ""
    lines = [line.split("#")[0].strip() for line in doc.splitlines() if line.startswith("    ")]
    return [line for line in lines if f"examples/{example.name}" in line.split()]


def to_argv(command: str, example: Path) -> tuple[list[str], dict[str, str]] | None:
    """``[ENV=value ...] python examples/X.py [args]`` or ``[ENV=value ...] torchrun --nproc-per-node N
    examples/X.py [args]`` as (argv, environment additions); None for any other form."""
    words = shlex.split(command)
    env = {}
    while words and ENV_ASSIGNMENT.fullmatch(words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    script = f"examples/{example.name}"
    if words[:2] == ["python", script]:
        return [sys.executable, *words[1:]], env
    if words[:1] == ["torchrun"] and words[1:2] == ["--nproc-per-node"] and words[3:4] == [script]:
        # torchrun's rendezvous port defaults to 29500; a free one (through torchrun's own PET_
        # variable, leaving the command as documented) lets test runs on one machine overlap.
        return [str(Path(sys.executable).with_name("torchrun")), *words[1:]], {**env, "PET_MASTER_PORT": free_port()}
    return None


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def example_commands() -> list:
    return [
        pytest.param(example, command, id=f"{example.name}: {command}")
        for example in EXAMPLES
        for command in documented_commands(example)
    ]


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= set(SUCCESS)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_documents_commands_this_test_runs(example):
    commands = documented_commands(example)
    assert commands, f"{example.name}: its docstring shows no indented 'python examples/{example.name}' line"
    for command in commands:
        assert to_argv(command, example) is not None, f"{example.name}: no way to run {command!r} here"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_no_example_is_named_like_an_importable_module(example):
    """`python examples/X.py` puts examples/ first on sys.path: an example named like a package (such as
    accelerate.py) would be imported in its place by the example itself or by a library it uses."""
    assert str(ROOT / "examples") not in sys.path
    assert importlib.util.find_spec(example.stem) is None, f"rename {example.name}: it shadows a module"


@pytest.mark.slow
@pytest.mark.parametrize(("example", "command"), example_commands())
def test_example_runs_as_documented(example, command):
    parsed = to_argv(command, example)
    assert parsed is not None
    argv, env = parsed
    out = subprocess.run(
        argv,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, f"{command} exited {out.returncode}:\n{out.stderr[-3000:]}"
    if example.name in SUCCESS:
        assert SUCCESS[example.name] in out.stdout, out.stdout[-2000:]

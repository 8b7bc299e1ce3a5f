"""Installing laperm's wheel keeps the torch a user already has; the tested pins live in constraints.txt."""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dependencies_are_ranges_and_the_tested_pins_are_in_constraints():
    deps = pyproject()["project"]["dependencies"]
    torch_dep = next(d for d in deps if re.match(r"torch\b", d))
    assert "==" not in torch_dep and ">=" in torch_dep  # a range, not the exact build CI tests
    pins = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    assert "torch==2.13.0" in pins
    assert torch.__version__.split("+")[0] == "2.13.0"  # the pin is what these tests run on
    for command in ((ROOT / ".ci" / "run").read_text(), (ROOT / "README.md").read_text()):
        assert "-c constraints.txt" in command
    extras = pyproject()["project"]["optional-dependencies"]
    assert {re.split(r"[<>=]", d)[0] for d in extras["integrations"]} == {
        "pytorch-lightning",
        "transformers",
        "accelerate",
        "tensorboard",
    }
    assert ".[dev,integrations]" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_installing_the_wheel_where_torch_2_13_is_installed_leaves_torch_in_place(tmp_path):
    """Build the wheel, then ask pip (offline, --dry-run) what installing it into this environment, which
    has torch 2.13.0, would change: laperm alone.  With the old exact pin to another torch, or a range
    that excluded this one, pip would have to fetch a torch and fails offline."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "results", "build", "*.egg-info", "__pycache__", "tests", "benchmarks", "docs"
        ),
    )
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    wheel = next(wheels.glob("laperm-*.whl"))
    report = tmp_path / "report.json"
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--quiet",
            "--report",
            str(report),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plan.returncode == 0, plan.stderr
    would_install = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}
    assert would_install == {"laperm"}

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

import laperm

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


def test_the_version_has_one_source_and_laperm_version_prints_it(capsys):
    from conftest import run_cli

    assert "version" not in pyproject()["project"] and "version" in pyproject()["project"]["dynamic"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "laperm.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", laperm.__version__)
    rc, out, _ = run_cli(capsys, "--version")
    assert (rc, out.strip()) == (0, f"laperm {laperm.__version__}")


def test_the_changelog_names_the_current_version_and_the_licence_is_mit():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"(?m)^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog)
    assert releases[0] == laperm.__version__ and "0.1.0" in releases  # newest first, as Keep a Changelog has it
    assert "## [Unreleased]" in changelog
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2026 the laperm authors" in licence
    assert pyproject()["project"]["license"] == {"text": "MIT"}


def test_ci_runs_the_release_and_docs_checks_and_the_extras_are_pinned():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/release_check.sh" in ci and "bash .ci/docs_check.sh" in ci
    release = (ROOT / ".ci" / "release_check.sh").read_text()
    for step in ("-m build", "twine check", "laperm/data/mnist/", 'laperm" train --epochs 1', 'laperm" verify'):
        assert step in release, step
    extras = pyproject()["project"]["optional-dependencies"]
    pins = {line.split("==")[0] for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    for dep in extras["docs"] + extras["release"]:
        assert re.split(r"[<>=\[]", dep)[0] in pins, dep

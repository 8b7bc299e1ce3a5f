"""One measurement per fresh Python process: a crash, a hang or a broken CUDA context stays in it.

On an H200 one failed CUDA-graph capture left the process unable to capture again (issue 21): every
later contender of the same process failed with errors that were not its own.  So the GPU
benchmark (:mod:`benchmarks.gpu`) and the GPU check (:mod:`benchmarks.gpu_check`) run each
contender as ``python -X faulthandler -m <module> ... --result FILE``:

* parent side, :func:`run_isolated`: starts the child with a timeout and returns ``(result, None)``
  or ``(None, error)``, where ``error`` holds the return code and the *full* traceback (the one the
  child wrote, else its stderr: ``faulthandler`` prints the Python stack of a segfault or abort);
* child side, :func:`child_main`: calls the measurement, writes ``{"result": ...}`` or
  ``{"traceback": ...}`` to ``FILE`` (stdout stays free for the library's prints) and exits 0 or 1.

Test hook: ``LAPERM_BENCH_PLANT`` (comma-separated contender keys, e.g. ``throughput:conv7:adam:fast:fp32``)
makes those contenders fail on purpose: by raising, or by ``os.abort()`` with a ``!abort`` suffix.
The tests use it to show that a failure becomes a row with its traceback and the other rows still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLANT_ENV = "LAPERM_BENCH_PLANT"
OUTPUT_KEPT = 20_000  # characters of a child's output kept when it left no traceback of its own


def _child_env() -> dict[str, str]:
    """The parent's environment, with the ``laperm`` the parent imported first on the child's path."""
    import laperm

    src = str(Path(laperm.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def run_isolated(module: str, args: list[str], timeout: float) -> tuple[Any, dict[str, Any] | None]:
    """``python -m module *args --result FILE`` in a fresh process: ``(result, None)`` or ``(None, error)``."""
    with tempfile.TemporaryDirectory(prefix="laperm-contender-") as tmp:
        path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-X", "faulthandler", "-m", module, *args, "--result", str(path)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = _text(e.stdout) + _text(e.stderr)
            return None, _error(None, f"timed out after {timeout:.0f} s (killed)\n{out[-OUTPUT_KEPT:]}", cmd)
        data = _read(path)
        if proc.returncode == 0 and "result" in data:
            return data["result"], None
        tb = data.get("traceback") or (proc.stdout + proc.stderr)[-OUTPUT_KEPT:] or "(no output)"
        if data.get("traceback") and proc.stderr.strip():
            tb += f"\n--- stderr ---\n{proc.stderr[-OUTPUT_KEPT:]}"
        return None, _error(proc.returncode, tb, cmd)


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _error(returncode: int | None, tb: str, cmd: list[str]) -> dict[str, Any]:
    """A failed contender: return code (None: killed at the timeout), full traceback, the command."""
    return {"returncode": returncode, "traceback": tb.rstrip("\n"), "command": " ".join(["python", *cmd[1:-1], "FILE"])}


def child_main(key: str, result_path: Path, fn: Callable[[], Any]) -> int:
    """Run ``fn`` (the contender named ``key``), write its JSON result or its traceback; the exit status."""
    try:
        _planted(key)
        out: dict[str, Any] = {"result": fn()}
        code = 0
    except BaseException:  # noqa: BLE001 (everything goes to the parent, which makes it a row)
        out, code = {"traceback": traceback.format_exc()}, 1
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(result_path)
    return code


def _planted(key: str) -> None:
    """The test hook: fail on purpose when ``key`` is listed in ``LAPERM_BENCH_PLANT``."""
    for item in filter(None, os.environ.get(PLANT_ENV, "").split(",")):
        name, _, how = item.partition("!")
        if name == key:
            if how == "abort":
                sys.stderr.write(f"planted abort of contender {key} ({PLANT_ENV})\n")
                sys.stderr.flush()
                os.abort()
            raise RuntimeError(f"planted failure of contender {key} ({PLANT_ENV}={os.environ[PLANT_ENV]})")

#!/usr/bin/env bash
# The release files, checked as a user meets them (called by .ci/run; runs alone too: `bash .ci/release_check.sh`).
#   1. `python -m build`: the sdist, then the wheel built from that sdist (so the sdist is complete);
#   2. `twine check --strict` on both;
#   3. the wheel carries the bundled MNIST (and its checksums) and the LICENSE;
#   4. the wheel installed into a fresh venv, base dependencies only, through constraints.txt;
#   5. from that install, outside the repository: `laperm --version`, one quick epoch, `laperm verify`.
# PYTHON: the interpreter that has `build` and `twine` (the release extra; default .venv/bin/python).
# KEEP_WORK=1: leave the temporary folder (CI, on a machine thrown away afterwards).
# Prints the seconds each step took.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-.venv/bin/python}
export PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg
WORK=$(mktemp -d)
# KEEP_WORK=1 leaves the work folder (the fresh venv is ~1 GB, and deleting it took ~75 s on a busy 2-core machine)
cleanup() { if [ "${KEEP_WORK:-0}" = 1 ]; then echo "release_check: left $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
step() { echo "release_check: $1 ($((SECONDS - T)) s)"; T=$SECONDS; }
T=$SECONDS

# built from a copy of the files git knows (tracked, or new and not ignored): nothing the build writes
# (src/laperm.egg-info, build/) lands in the working tree, and no stray local file slips into the sdist
mkdir "$WORK/tree"
"$PY" - "$WORK/tree" <<'PYEOF'
import shutil, subprocess, sys
from pathlib import Path
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True)
for name in filter(None, listed.stdout.decode().split("\0")):
    if Path(name).is_file():  # a tracked file deleted in the working tree is left out
        (Path(sys.argv[1]) / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(name, Path(sys.argv[1]) / name)
PYEOF
"$PY" -m build --outdir "$WORK/dist" "$WORK/tree" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
step "built $(cd "$WORK/dist" && echo *)"
"$PY" -m twine check --strict "$WORK"/dist/*
step "twine check passed"

VERSION=$("$PY" -c 'import ast, sys; t = ast.parse(open("src/laperm/__init__.py").read())
print(next(n.value.value for n in t.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"))')
WHEEL="$WORK/dist/laperm-$VERSION-py3-none-any.whl"
"$PY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
wanted = {f"laperm/data/mnist/{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))}
wanted.add("laperm/data/mnist/SHA256SUMS")
missing = sorted(wanted - names)
licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")]
if missing or not licence:
    sys.exit(f"the wheel lacks {missing or 'the LICENSE'}")
PYEOF
step "the wheel holds the bundled MNIST and the LICENSE"

python3.11 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q -c "$ROOT/constraints.txt" "$WHEEL" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; exit 1; }
step "installed the wheel into a fresh venv"

cd "$WORK"  # away from src/: what runs is the installed package
[ "$("$WORK/venv/bin/laperm" --version)" = "laperm $VERSION" ]
"$WORK/venv/bin/laperm" train --epochs 1 --train-subset 5000 --threads 1 --no-progress --out runs --name wheel \
  >"$WORK/train.log" 2>&1 || { cat "$WORK/train.log"; exit 1; }
tail -n 2 "$WORK/train.log"
"$WORK/venv/bin/laperm" verify runs/wheel
step "trained one epoch and verified from the installed wheel"

#!/usr/bin/env bash
# The documentation site, built as CI builds it (called by .ci/run; runs alone too: `bash .ci/docs_check.sh`).
#   1. docs/tutorial.ipynb is committed without outputs, and executes (nbclient) in under NOTEBOOK_LIMIT_S;
#   2. `mkdocs build --strict` from that executed copy (scripts/docs_hooks.py: LAPERM_EXECUTED_NOTEBOOKS), so the
#      site shows the notebook's real outputs without running it twice. --strict fails on a broken link, an API
#      object that is not found or a docstring it cannot parse.
# MKDOCS: the mkdocs of an environment with the docs extra (default .venv/bin/mkdocs); its python runs the notebook.
set -euo pipefail
cd "$(dirname "$0")/.."
MKDOCS=${MKDOCS:-.venv/bin/mkdocs}
PY=$(dirname "$MKDOCS")/python
NOTEBOOK_LIMIT_S=${NOTEBOOK_LIMIT_S:-180}
export NO_MKDOCS_2_WARNING=1 PIP_DISABLE_PIP_VERSION_CHECK=1
EXECUTED=$(mktemp -d)
trap 'rm -rf "$EXECUTED"' EXIT
T=$SECONDS
"$PY" - "$NOTEBOOK_LIMIT_S" "$EXECUTED/tutorial.ipynb" <<'PYEOF'
import sys, time, nbformat
from nbclient import NotebookClient
limit, out = float(sys.argv[1]), sys.argv[2]
nb = nbformat.read("docs/tutorial.ipynb", as_version=4)
if any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code"):
    sys.exit("docs/tutorial.ipynb is committed with outputs: clear them (Jupyter: Edit > Clear All Outputs)")
start = time.perf_counter()
NotebookClient(nb, timeout=int(limit), kernel_name="python3").execute()  # a cell that raises fails here
took = time.perf_counter() - start
print(f"docs_check: the tutorial notebook executed in {took:.0f} s (limit {limit:.0f} s)")
if took > limit:
    sys.exit(f"docs/tutorial.ipynb took {took:.0f} s, over the {limit:.0f} s limit: make it smaller")
nbformat.write(nb, out)
PYEOF
T2=$SECONDS
LAPERM_EXECUTED_NOTEBOOKS=$EXECUTED LAPERM_DOCS_EXECUTE=false "$MKDOCS" build --strict --site-dir site
echo "docs_check: site built with --strict in $((SECONDS - T2)) s (the notebook's run before it: $((T2 - T)) s)"

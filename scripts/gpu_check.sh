#!/usr/bin/env bash
# Does the GPU path work?  One call, under 5 minutes on one GPU (hard limits: tests 100 s, rows 185 s):
#   1. every CUDA test, in every file (pytest -m cuda: the tests marked cuda, slow ones included), among them a
#      real failed capture (a host sync inside the captured region, in a fresh process) -> cuda-tests.txt
#   2. python -m benchmarks.gpu_check: every image model --mode fast accepts, 60 steps fast and eager on the
#      same batches, fp32 and bf16, LaPerm and Adam, each row in its own process, every step's loss compared;
#      plus, on the first model: an lr schedule, an odd-sized last batch, a stack of 4 (benchmarks/gpu_check.py)
# Files in $OUT (default /tmp/gpu-out), five small ones:
#   gpu-check.md     the verdict, the table (captured?, loss fast vs eager within tolerance, img/s), tracebacks
#   gpu-check.json   the same rows in full (written after every row: a cut-off run keeps what it checked)
#   cuda-tests.txt   the tests' output      hardware.txt   nvidia-smi and torch's view      log.txt   everything
# Exit status 0 only when the tests passed and every row is ok.  Run from the repository root; needs python3
# with torch (numpy, pytest, hypothesis for the tests); nothing is installed: the package runs from src/.
# Environment: DEVICE=cuda (default) | cpu   QUICK=1: a smoke run (conv7's 7 rows, 6 steps, batch 8; seconds on a
#   quiet machine)   PYTHON (default python3)   OUT   RUN_TESTS (default 1 on cuda, 0 on cpu)   JOBS (row processes at
#   once; default 4, quick 2)
set -u -o pipefail
PY=${PYTHON:-python3}; DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-0}; OUT=${OUT:-/tmp/gpu-out}
RUN_TESTS=${RUN_TESTS:-$([ "$DEVICE" = cuda ] && echo 1 || echo 0)}
JOBS=${JOBS:-$([ "$QUICK" = 1 ] && echo 2 || echo 4)}
ROWS_LIMIT=$([ "$QUICK" = 1 ] && echo 900 || echo 185)  # the rows' own budget is 160 s (quick: 600 s, a CPU smoke run)
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
date -u > "$LOG"

if [ "$DEVICE" = cuda ]; then
  if ! nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/hardware.txt" 2>&1; then
    cat "$OUT/hardware.txt"; echo "error: nvidia-smi failed: this is not a CUDA GPU machine (DEVICE=cpu QUICK=1 for a smoke run)"
    exit 1
  fi
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT/hardware.txt" "$LOG"

args=(check --device "$DEVICE" --out "$OUT" --jobs "$JOBS")
if [ "$RUN_TESTS" = 1 ]; then
  echo "== CUDA tests: pytest -m cuda tests (limit 100 s)" | tee -a "$LOG"
  timeout -s TERM -k 10 100 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests > "$OUT/cuda-tests.txt" 2>&1
  rc=$?
  tail -n 3 "$OUT/cuda-tests.txt" | tee -a "$LOG"
  args+=(--tests-log "$OUT/cuda-tests.txt" --tests-rc "$rc")
fi
if [ "$QUICK" = 1 ]; then args+=(--quick); fi

echo "== $PY -m benchmarks.gpu_check ${args[*]} (limit ${ROWS_LIMIT} s)" | tee -a "$LOG"
timeout -s TERM -k 10 "$ROWS_LIMIT" "$PY" -m benchmarks.gpu_check "${args[@]}" 2>&1 | tee -a "$LOG"
status=$?
ls -la "$OUT" | tee -a "$LOG"
exit $status

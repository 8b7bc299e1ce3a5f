#!/usr/bin/env bash
# Every GPU measurement of issue 13 in one call, well inside 10 minutes (sections have time budgets:
# CUDA tests 100 s, benchmark 470 s: each contender is a process of its own), writing a few small files to $OUT:
#   log.txt               everything printed (each measurement's row as it is taken, so a cut-off run keeps its rows)
#   hardware.txt          nvidia-smi and torch's view of the card
#   benchmarks-gpu.json   the figures, in the schema  (copy to docs/ to publish)
#   benchmarks.md         docs/benchmarks.md with the GPU section spliced in (copy to docs/ to publish)
#   cuda-tests.txt        the CUDA-only tests (graph step vs eager, batched sync, device augmentation)
# Needs only python3 with torch (CUDA build) and numpy, pytest and hypothesis for the tests: the GPU machine's
# image has them (torch 2.11 there; nothing is installed, the package runs from src/ through PYTHONPATH).
# Run from the repository root.  Environment:
#   DEVICE=cuda (default) | cpu      QUICK=1: tiny sizes (a smoke run; numbers mean nothing)
#   PYTHON (default python3)         OUT (default /tmp/gpu-out)      RUN_TESTS (default 1 on cuda, 0 on cpu)
set -u -o pipefail
PY=${PYTHON:-python3}; DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-0}; OUT=${OUT:-/tmp/gpu-out}
RUN_TESTS=${RUN_TESTS:-$([ "$DEVICE" = cuda ] && echo 1 || echo 0)}
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# budget SECONDS CMD...: run CMD under a time limit, appending its output to the log
budget() { local s=$1; shift; echo "== $* (limit ${s}s)" | tee -a "$LOG"; timeout -s TERM -k 10 "$s" "$@" 2>&1 | tee -a "$LOG"; }
date -u > "$LOG"

if [ "$DEVICE" = cuda ]; then
  if ! nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu \
       --format=csv > "$OUT/hardware.txt" 2>&1; then
    cat "$OUT/hardware.txt"; echo "error: nvidia-smi failed: this is not a CUDA GPU machine (DEVICE=cpu QUICK=1 for a smoke run)"
    exit 1
  fi
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT/hardware.txt" "$LOG"

if [ "$RUN_TESTS" = 1 ]; then  # correctness on this device first: a wrong fast path has no speed worth reporting
  budget 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_step.py tests/test_sync_many.py \
      tests/test_device_data.py > "$OUT/cuda-tests.txt"
  tail -n 5 "$OUT/cuda-tests.txt"
fi

cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null || true
args=(--device "$DEVICE" --output "$OUT/benchmarks.md" --gpu-json "$OUT/benchmarks-gpu.json")
if [ "$QUICK" = 1 ]; then args+=(--only gpu --quick --threads 1); fi
budget 470 "$PY" -m benchmarks "${args[@]}"
status=$?
ls -la "$OUT" | tee -a "$LOG"
exit $status

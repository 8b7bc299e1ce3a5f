#!/usr/bin/env bash
# One GPU window of `laperm run paper` (issue 23; docs/gpu.md, "The whole table in GPU windows"):
#   1. unpack the state it is given (the previous window's $OUT/state; none: start fresh),
#   2. advance the runs until a deadline: unfinished ones first, PARALLEL side by side, every run
#      stopping cleanly (finished, or a checkpoint saved) before it,
#   3. pack state and results into $OUT/state (`laperm pack`), plus $OUT/window.log.
# The next window takes $OUT/state as its STATE_IN. Usage:
#   bash scripts/gpu_window.sh [STATE_DIR]                   # or STATE_IN=DIR
#   QUICK=1 DEVICE=cpu WINDOW_S=40 bash scripts/gpu_window.sh # the CPU smoke test (F1/F2, seconds)
# Environment:
#   OUT       output folder (default /tmp/gpu-out); what comes back: <= 8 files, 16 MiB each, 64 MiB in all
#   WINDOW_S  seconds this whole script may take (default 540, for a 600 s command limit)
#   PACK_S    seconds kept at the end for the status listing and packing (default 40)
#   PARALLEL  runs side by side (default 4; QUICK 2)       SEEDS  seeds, e.g. "0 1 2" (default 0)
#   ONLY      `laperm run --only` filter (QUICK default model=f: the F1/F2 rows)
#   MAX_RUNS  train at most this many runs this window, unfinished first (default: no cap)
#   MIN_START start no run with less time left than this (default 30; QUICK 2)
#   DEVICE    cuda (default) or cpu              MAX_TOTAL_MIB  packed state limit (default 60)
#   CIFAR_PACK  scripts/cifar_jpeg_pack.py output (default .devpack/cifar), unpacked when present
#   RUN_EXTRA  more `laperm run` arguments (e.g. --no-stack: train every run alone; stacking is on by default on CUDA)
#   COMMIT    commit recorded for this window (default: git rev-parse HEAD, else "unknown")
#   PYTHON    the Python to use (default python3)   LAPERM  how to call laperm (default: $PYTHON -m laperm)
#   WORK      work folder (default: a new temporary one)
set -u
T0=$(date +%s)
PY=${PYTHON:-python3}; QUICK=${QUICK:-0}; DEVICE=${DEVICE:-cuda}; OUT=${OUT:-/tmp/gpu-out}
WINDOW_S=${WINDOW_S:-540}; PACK_S=${PACK_S:-40}; SEEDS=${SEEDS:-0}; MAX_TOTAL_MIB=${MAX_TOTAL_MIB:-60}
if [ "$QUICK" = 1 ]; then PARALLEL=${PARALLEL:-2}; ONLY=${ONLY:-model=f}; MIN_START=${MIN_START:-2}
else PARALLEL=${PARALLEL:-4}; ONLY=${ONLY:-}; MIN_START=${MIN_START:-30}; fi
STATE=${1:-${STATE_IN:-}}
WORK=${WORK:-$(mktemp -d /tmp/laperm-window.XXXXXX)}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export LAPERM_CACHE=${LAPERM_CACHE:-/tmp/laperm-cache}
read -r -a LAPERM_CMD <<< "${LAPERM:-$PY -m laperm}"
mkdir -p "$OUT" "$WORK"
LOG=$OUT/window.log
say() { echo "[window $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
laperm() { "${LAPERM_CMD[@]}" "$@"; }

# 1. The state of the previous window.
if [ -n "$STATE" ]; then
  if [ ! -f "$STATE/plan.json" ]; then say "error: $STATE has no plan.json (pass the previous window's OUT/state)"; exit 2; fi
  say "unpacking $STATE into $WORK"
  laperm unpack "$STATE" --into "$WORK" >> "$LOG" 2>&1 || { say "error: laperm unpack failed (see above)"; exit 2; }
fi
mkdir -p "$WORK/paper"
if [ "$QUICK" != 1 ] && [ -d "${CIFAR_PACK:-.devpack/cifar}" ] && [ -z "${LAPERM_CIFAR10:-}" ]; then
  "$PY" scripts/cifar_jpeg_pack.py unpack "${CIFAR_PACK:-.devpack/cifar}" /tmp/cifar10/cifar10-jpg.zip >> "$LOG" 2>&1
  export LAPERM_CIFAR10=/tmp/cifar10
fi
# Where and with what this window trains. Each run records its own stretches (its provenance.jsonl,
# with this commit: LAPERM_COMMIT); paper/provenance.jsonl is the windows' log, and credits no run.
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export LAPERM_COMMIT=$COMMIT
GPU=cpu; [ "$DEVICE" != cpu ] && GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
TORCH=$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null)
printf '{"window_start": %s, "device": "%s", "torch": "%s", "commit": "%s"}\n' "$T0" "${GPU:-unknown}" \
  "${TORCH:-unknown}" "$COMMIT" >> "$WORK/paper/provenance.jsonl"

# 2. Train until the deadline (a timeout behind it, in case a run hangs: SIGTERM also stops cleanly).
LEFT=$(( T0 + WINDOW_S - PACK_S - $(date +%s) ))
ARGS=(--out "$WORK" --device "$DEVICE" --seeds $SEEDS --parallel "$PARALLEL" --min-start "$MIN_START")
[ "$QUICK" = 1 ] && ARGS+=(--budget quick)
[ -n "$ONLY" ] && ARGS+=(--only "$ONLY")
[ -n "${MAX_RUNS:-}" ] && ARGS+=(--max-runs "$MAX_RUNS")
read -r -a EXTRA <<< "${RUN_EXTRA:-}"
if [ "$LEFT" -gt "$MIN_START" ]; then
  say "training for at most ${LEFT}s: laperm run paper ${ARGS[*]} ${EXTRA[*]}"
  timeout -s TERM $(( LEFT + 15 )) "${LAPERM_CMD[@]}" run paper "${ARGS[@]}" "${EXTRA[@]}" --deadline "$LEFT" \
    >> "$LOG" 2>&1 || say "laperm run exited with $? (the runs it stopped are resumable)"
else
  say "no time left to train (${LEFT}s)"
fi
for f in "$WORK"/paper/logs/run-*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 4 "$f"; } >> "$LOG"; done
laperm run paper "${ARGS[@]}" --dry-run >> "$LOG" 2>&1  # where every run stands now

# 3. Pack state and results for the next window (and for results/paper).
say "packing into $OUT/state"
rm -rf "$OUT/state"
if ! ls "$WORK"/paper/*/config.yaml > /dev/null 2>&1; then
  say "no run folder to pack: the next window starts fresh"
elif laperm pack --help > /dev/null 2>&1; then
  laperm pack "$WORK/paper" --out "$OUT/state" --max-file-mib 16 --max-total-mib "$MAX_TOTAL_MIB" >> "$LOG" 2>&1 \
    || say "error: laperm pack failed (see above)"
else  # (before `laperm pack` exists: the metrics only; unfinished runs cannot continue from this)
  say "laperm pack is not available: packing metrics and configs only"
  mkdir -p "$OUT/state" && tar czf "$OUT/state/results.tgz" --exclude='*.pt' --exclude=checkpoints -C "$WORK" paper
fi
FILES=$(find "$OUT" -type f | wc -l); BYTES=$(du -cb $(find "$OUT" -type f) | tail -n 1 | cut -f1)
say "done: $FILES files, $(( BYTES / 1048576 )) MiB in $OUT (limits 8 files, 64 MiB); work folder $WORK"
[ "$FILES" -le 8 ] && [ "$BYTES" -le $(( 64 * 1048576 )) ] || { say "error: $OUT is over the limits"; exit 1; }

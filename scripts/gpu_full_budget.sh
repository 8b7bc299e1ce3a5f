#!/usr/bin/env bash
# `laperm run full` on one borrowed GPU machine: the four runs in parallel, each stopped
# (checkpoint saved, metrics kept) at a deadline, then the metrics packed into $OUT/full.tgz.
# Used on an NVIDIA H100 (see results/notes/full.md). Environment:
#   LAPERM_SRC  package source to run (default src)    DEADLINE  seconds before SIGTERM (default 510)
#   BUDGET      paper | quick                           CIFAR_PACK  scripts/cifar_jpeg_pack.py output
set -u
SRC=${LAPERM_SRC:-src}; DEADLINE=${DEADLINE:-510}; BUDGET=${BUDGET:-paper}
OUT=${OUT:-/tmp/gpu-out}; RES=/tmp/laperm-results; mkdir -p "$OUT" "$RES/full"
export PYTHONPATH=$PWD/$SRC PYTHONUNBUFFERED=1 LAPERM_CACHE=/tmp/laperm-cache LAPERM_CIFAR10=/tmp/cifar10
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$RES/full/hardware.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$RES/full/hardware.txt"
python3 scripts/cifar_jpeg_pack.py unpack "${CIFAR_PACK:-.devpack/cifar}" /tmp/cifar10/cifar10-jpg.zip
python3 -c "from laperm.data import load_dataset; print(load_dataset('cifar10', '/tmp/cifar10').name)"  # decode once
i=0
for sel in "model=conv2 method=laperm" "model=conv2 method=adam" "model=conv7 method=laperm" "model=conv7 method=adam"; do
  i=$((i + 1))
  timeout -s TERM "$DEADLINE" python3 -m laperm run full --budget "$BUDGET" --only "$sel" --threads 2 \
      --out "$RES" > "$RES/full/log$i.txt" 2>&1 &
done
if [ -d "$SRC/../tests" ]; then
  (cd "$SRC/.." && timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_optim.py tests/test_reconnect.py \
      -k cuda > "$RES/full/cuda_tests.txt" 2>&1) &
fi
wait
python3 -m laperm run full --budget "$BUDGET" --dry-run --out "$RES" > "$RES/full/manifest_log.txt" 2>&1
tail -n 3 "$RES"/full/log*.txt "$RES/full/cuda_tests.txt"
tar czf "$OUT/full.tgz" --exclude='*.pt' --exclude=checkpoints -C "$RES" full && ls -la "$OUT"

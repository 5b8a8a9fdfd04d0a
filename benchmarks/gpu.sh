#!/usr/bin/env bash
# vggnet bench on one CUDA GPU, in one short run (2-3 minutes; killed at 290 s so it stays under
# 5): bf16 autocast (precision auto), channels_last, cudnn.benchmark, and torch.compile of the
# default inference path as an extra row; 5 s of timing per group (--budget 5; each group also
# stops after 25 rounds). Writes, under $OUT (default: the current directory):
#   bench-gpu.json   the result, rewritten after every section (so a run cut short keeps what it
#                    finished, marked "partial"); its "summary" names the hardware class
#                    ("cuda") and holds that class's ratios and targets (vggnet.bench.report)
#   bench-gpu.md     the Markdown table it printed
#   gpu-info.txt     nvidia-smi's view of the card, python and torch versions
#
# Run from anywhere; no install needed (PYTHONPATH=src), nothing is downloaded:
#   OUT=/tmp/gpu benchmarks/gpu.sh                 # configuration D
#   OUT=/tmp/gpu benchmarks/gpu.sh --all           # A, D and E: 3 more compilations per config,
#                                                  # so add --budget 2 or drop --compile's row by
#                                                  # running `python3 -m vggnet bench --device cuda --all`
# Extra arguments go to `vggnet bench` after the defaults (a later --budget wins).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c 'import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
} > "$OUT/gpu-info.txt" 2>&1
cat "$OUT/gpu-info.txt"
timeout 290 "$PY" -m vggnet bench --device cuda --compile --budget 5 --json "$OUT/bench-gpu.json" "$@" \
  | tee "$OUT/bench-gpu.md"

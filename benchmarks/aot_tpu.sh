#!/usr/bin/env bash
# The TPU memory / FLOPs table of BENCHMARKS.md: the paper's RN50 and RN50x4 pretraining recipes
# (global batch 96, 100 proposals + the global box per image, 800x1333 in a 1344x1344 canvas),
# compiled ahead of time for v5p and v5e slices on this CPU machine. Needs `make aot-setup`.
# Usage: benchmarks/aot_tpu.sh [OUT_DIR]   (JSON rows per recipe land in OUT_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/aot}
mkdir -p "$out"
py=${AOT_PYTHON:-.venv-tpu/bin/python}
"$py" launch/aot_compile.py --config=configs/pretrain_rn50_cc3m.py --preset=RN50 \
  --topology=v5p:2x2x1,v5e:2x4,v5e:4x4,v5e:4x8 --json="$out/rn50.json"
"$py" launch/aot_compile.py --config=configs/pretrain_rn50x4_cc3m.py --preset=RN50x4 \
  --topology=v5p:2x2x1,v5e:4x4,v5e:4x8 --json="$out/rn50x4.json"

#!/usr/bin/env bash
# Issue 4's GPU half, as one prepared script for a session that has a CUDA device: both benchmarks on
# the 224 px ResNet-50 case (bf16 autocast, channels_last, pinned loader workers: the CUDA defaults),
# results in results/bench_{student,cache}_cuda.{md,json}. Not yet run: no GPU was lent to the session
# that wrote it. Expect ~5-8 minutes on one H100 (mostly generating the JPEG shards and the export).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${ROOT:-runs/bench_cuda}
DATA=(--set data.n_max=64 --set export.views=4)          # 8 classes x 64 = 512 images, 2,048 views
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY benchmarks/bench_student.py --case rn50 --root "$ROOT" --rounds 2 --warmup 5 --steps 20 \
    "${DATA[@]}" --set student.batch_size=128 --name bench_student_cuda
$PY benchmarks/bench_cache.py --cases rn50 --root "$ROOT" "${DATA[@]}" --set export.batch_size=512 \
    --name bench_cache_cuda

#!/usr/bin/env bash
# The GPU check: the first person with a CUDA device runs this (about 5 minutes on one H100 / H200).
#   1. the smoke pipeline end to end (prepare, teachers, export, student, evaluate) on CUDA, bf16, channels_last;
#   2. torchrun --nproc_per_node 1: NCCL collectives through cbd_cache.system.distributed, then a student under torchrun;
#   3. the student benchmark (none / cache / online) on the 224 px ResNet-50 case;
#   4. the smoke pipeline again with views.decode=gpu (export, student, cache verify decoding on the device);
#   5. the loader benchmark at 224 px with the gpu decode path (nvJPEG, crop and resize on the device) beside
#      the CPU paths, and the cores one GPU needs (from check 3's step rate).
# Writes results/gpu_check_cuda.md (each check's status, seconds and key lines),
# results/bench_student_cuda.{md,json} and results/bench_loader_cuda.{md,json}. Not yet run on a GPU:
# no session so far had one.
#   DEVICE=cpu benchmarks/run_gpu.sh   the same plumbing on CPU with gloo and tiny settings (tests run it)
#   PY=python CBD=cbd-cache OUT=dir ROOT=dir   interpreter, CLI, results folder, scratch workdirs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CBD=${CBD:-.venv/bin/cbd-cache}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-results}
ROOT=${ROOT:-runs/gpu_check}
if [ "$DEVICE" = cuda ]; then
    SETS=(--set pipeline.device=cuda --set pipeline.amp=bf16 --set pipeline.channels_last=on)
    BACKEND=nccl
    BENCH=(--case rn50 --rounds 2 --warmup 5 --steps 20 --set data.n_max=64 --set export.views=4
           --set student.batch_size=128)
    LOADER=(--paths full reduced bounded gpu --images 512 --rounds 3)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
else
    SETS=(--set pipeline.device=cpu --set pipeline.amp=off --set pipeline.channels_last=off
          --set teacher.epochs=1 --set student.epochs=1)
    BACKEND=gloo
    BENCH=(--case small --rounds 1 --warmup 1 --steps 2 --set data.n_max=64 --set export.views=2
           --set student.batch_size=16)
    LOADER=(--paths full gpu --images 64 --rounds 1 --batches 1 --warmup 1 --workers 1)
fi
rm -rf "$ROOT"
mkdir -p "$ROOT" "$OUT"
REPORT="$OUT/gpu_check_$DEVICE.md"
{
    echo "# GPU check on $DEVICE"
    echo
    echo "Command: \`DEVICE=$DEVICE benchmarks/run_gpu.sh\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
         "$(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "| check | status | seconds |"
    echo "|---|---|---:|"
} > "$REPORT.head"
: > "$REPORT.body"

check() {   # check NAME COMMAND...: run it, log to $ROOT/NAME.log, add its row; stop the script on failure
    local name=$1 t0=$SECONDS status=ok
    shift
    "$@" > "$ROOT/$name.log" 2>&1 || status=FAILED
    echo "| $name | $status | $((SECONDS - t0)) |" >> "$REPORT.head"
    { echo; echo "## $name"; echo; echo '```'; tail -n 15 "$ROOT/$name.log"; echo '```'; } >> "$REPORT.body"
    if [ "$status" != ok ]; then
        cat "$REPORT.head" "$REPORT.body" > "$REPORT"
        echo "$name failed; see $ROOT/$name.log and $REPORT" >&2
        exit 1
    fi
}

W="$ROOT/smoke"
check smoke_pipeline "$CBD" run --pipeline pipelines/smoke.toml --workdir "$W" "${SETS[@]}"
check torchrun_collectives "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/collectives.py "$BACKEND"
check torchrun_student "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 --no-python "$CBD" \
    train-student --pipeline pipelines/smoke.toml --workdir "$W" "${SETS[@]}" --set student.name=torchrun
check bench_student env CBD_RESULTS="$OUT" "$PY" benchmarks/bench_student.py --root "$ROOT/bench" \
    --name "bench_student_$DEVICE" "${BENCH[@]}"
check smoke_gpu_decode "$CBD" run --pipeline pipelines/smoke.toml --workdir "$ROOT/smoke_gpu_decode" "${SETS[@]}" \
    --set views.decode=gpu
check cache_verify_gpu_decode "$CBD" cache verify --pipeline pipelines/smoke.toml --workdir "$ROOT/smoke_gpu_decode" \
    "${SETS[@]}" --set views.decode=gpu
check bench_loader env CBD_RESULTS="$OUT" "$PY" benchmarks/bench_loader.py --device "$DEVICE" --root "$ROOT/loader" \
    --name "bench_loader_$DEVICE" "${LOADER[@]}"
{ echo; echo "## smoke results"; echo; cat "$W/results.md"; } >> "$REPORT.body"
cat "$REPORT.head" "$REPORT.body" > "$REPORT"
rm -f "$REPORT.head" "$REPORT.body"
echo "wrote $REPORT"

#!/usr/bin/env bash
# Every benchmark, one command. On a CUDA machine: bench/run_all.sh ; CPU smoke scale: bench/run_all.sh --quick
#   --out DIR   where each benchmark's table (.txt) and results (.json) go (default bench/results/<UTC time>-<scale>)
# Generated photos and stores are kept in $BENCH_WORK (default bench/_work) and reused by later runs.
# Python: $PYTHON, else .venv/bin/python (scripts/setup.sh), else python. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=() scale=full out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=(--quick) scale=quick ;;
        --out) out="$2"; shift ;;
        *) echo "usage: bench/run_all.sh [--quick] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
out=${out:-bench/results/$(date -u +%Y%m%dT%H%M%SZ)-$scale}
mkdir -p "$out"

failed=()
run() {  # run NAME ARGS...: the table to the terminal and NAME.txt, the results to NAME.json; a failure is noted, not fatal
    local name=$1; shift
    local start=$SECONDS status=0
    echo "== $name $* ${quick[*]}"
    "$PYTHON" "bench/$name.py" "${quick[@]}" "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt" || status=$?
    [ $status = 0 ] || failed+=("$name (exit $status)")
    echo "== $name: $((SECONDS - start)) s" | tee -a "$out/$name.txt"
    echo
}

{ date -u; uname -a; "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
} > "$out/env.txt" 2>&1

if [ $scale = full ]; then
    run teachers --compile sam
    run build          # leaves <work>/stores/three-1000.zarr for train and online
    run storage
    run train
    run online
    run student_speed --models eradio_small eradio_base eradio_large vit_small_patch16_224 vit_base_patch16_224 vit_large_patch16_224 vit_huge_patch14_clip_224 \
        --resolutions 224 512 --batch-size 32 --backbone-only
else
    run teachers
    run build
    run storage
    run train
    run online
    run student_speed
fi
echo "results in $out ($SECONDS s)"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi

#!/usr/bin/env bash
# The main job on the embedded default: local Ray, a local Zarr store, a generated sample dataset
# world (scenes with known answers, and some bad files) and the offline `toy` teachers trained on that world
# (committed in cache/toy/); then inspect, verify, train two students, evaluate them against the teachers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source .venv/bin/activate
mkdir -p demo
[ -d demo/world/images ] || radio-cache sample demo/world --scenes --images 240 --seed 5
radio-cache build demo/world/images --out demo/cache.zarr --teachers toy --views 2 --shard-size 32 --workers 2
radio-cache info demo/cache.zarr
radio-cache verify demo/cache.zarr
rm -rf demo/run demo/run_cnn
radio-train demo/cache.zarr --student vit_tiny_convstem_patch16_224 --out demo/run --steps 100 --batch-size 32 \
    --resolution 128 --workers 2 --log-every 20 --holdout 0.25
# the same store, no rebuild, trains a CNN student too
radio-train demo/cache.zarr --student resnet18 --out demo/run_cnn --steps 10 --batch-size 16 \
    --resolution 128 --workers 2 --log-every 5 --holdout 0.25
radio-cache text demo/cache.zarr
# every task, teacher and student side by side (the toy SAM is found by its recorded sha256: no
# --sam-checkpoint); also at 192 px (--resolutions: fidelity per side)
radio-eval demo/cache.zarr demo/run --out demo/eval --resolutions 128,192 --no-throughput
grep -E '^\| (features|teacher|clip|dinov2|sam|student)' demo/eval/report.md

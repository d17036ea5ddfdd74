#!/usr/bin/env bash
# The main job on the embedded default: local Ray, a local Zarr store, a generated sample dataset
# (with some bad files) and the offline `tiny` teachers; then inspect, verify, train two students, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source .venv/bin/activate
mkdir -p demo
[ -d demo/data/images ] || radio-cache sample demo/data --images 64
radio-cache build demo/data/images --out demo/cache.zarr --teachers tiny --views 2 --shard-size 16 --workers 2
radio-cache info demo/cache.zarr
radio-cache verify demo/cache.zarr
rm -rf demo/run demo/run_cnn
radio-train demo/cache.zarr --student vit_small_patch16_224 --out demo/run --steps 30 --batch-size 16 \
    --resolution 64 --workers 2 --log-every 5 --holdout 0.25
# the same store, no rebuild, trains a CNN student too
radio-train demo/cache.zarr --student resnet18 --out demo/run_cnn --steps 10 --batch-size 16 \
    --resolution 64 --workers 2 --log-every 5 --holdout 0.25
radio-cache text demo/cache.zarr
# also at 128 px (--resolutions: fidelity per side); the SAM metric runs by default here: the tiny SAM
# teacher's decoder is seeded (a real one needs --sam-checkpoint)
radio-eval demo/cache.zarr demo/run --out demo/eval --resolutions 64,128
sed -n '/^## SAM mask IoU/,/^## Pictures/p' demo/eval/report.md | grep '^|'

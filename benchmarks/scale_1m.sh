#!/usr/bin/env bash
# Issue 14 evidence: a 1M-cell x 2,000-gene SAMS screen simulated in row blocks, then
# train (fixed steps) / evaluate-ate / export-latents from the backed file; prints the wall
# time and peak RSS of each command (GNU time). Needs ~10 GB of free disk in DIR.
#   bash benchmarks/scale_1m.sh [DIR] [STEPS]
set -euo pipefail
DIR=${1:-/tmp/cellpert_1m}
STEPS=${2:-200}
THREADS=${THREADS:-2}  # torch + BLAS threads per command
SPLIT=${SPLIT:-8000 1000 1000}  # cells per label (train val test): 100 labels x 10,000 = 1M cells
BIN=$(dirname "$0")/../.venv/bin
mkdir -p "$DIR"
run() { /usr/bin/time -f "%e s wall, peak RSS %M KiB" "$@"; }
echo "== simulate (in blocks)"
run "$BIN/cellpert" simulate sams -o "$DIR/screen.h5ad" --seed 0 --n-perturbations 99 --n-latent 8 \
    --n-cells-per-perturbation $SPLIT --n-control-cells $SPLIT --n-genes 2000 --in-blocks
ls -la "$DIR/screen.h5ad"
echo "== train (backed, $STEPS steps)"
rm -rf "$DIR/run"
run "$BIN/cellpert" --threads "$THREADS" train "$DIR/screen.h5ad" --model samsvae --out "$DIR/run" --backed \
    --n-latent 8 --max-steps "$STEPS" --no-early-stopping --batch-size 512 --lr 3e-3 --quiet
echo "== evaluate-ate (backed)"
run "$BIN/cellpert" --threads "$THREADS" evaluate-ate "$DIR/screen.h5ad" --model "$DIR/run" --n-draws 20 --iwelbo-samples 10
echo "== export-latents (backed)"
run "$BIN/cellpert" --threads "$THREADS" export-latents "$DIR/screen.h5ad" --model "$DIR/run"

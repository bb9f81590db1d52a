#!/usr/bin/env bash
# Faithfulness evaluation of the 800-image EfficientNet-Lite0 run (4 layers, 3 transitions,
# 100 images for concept extraction, 20 for inter-layer), timed; then the SAE sparsity ablation.
#   bash bench/eval_imagenet800.sh [RUN_DIR] [THREADS] [LOG]
set -euo pipefail
RUN=${1:-runs/imagenet800}
THREADS=${2:-2}
LOG=${3:-/tmp/gig-evaluate-imagenet800.log}
export OMP_NUM_THREADS=$THREADS
/usr/bin/time -v gig evaluate "$RUN" --extraction-images 100 --interlayer-images 20 \
    --threads "$THREADS" 2>&1 | tee "$LOG"
cat "$RUN/evaluate/results.md"
# SAE sensitivity to its number of active latents k (the main table uses the run's own sparsity).
for k in 16 32; do
    gig evaluate "$RUN" --extraction-images 100 --interlayer-images 0 -m sae --sae-k $k \
        --out "$RUN/evaluate/ablation-sae-k$k" --threads "$THREADS" 2>&1 | tail -12
done

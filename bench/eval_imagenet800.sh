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
# Sensitivity of the hand-written SAE (sae-torch, the one in the docs' tables) to its active latents k.
for k in 16 32; do
    gig evaluate "$RUN" --extraction-images 100 --interlayer-images 0 -m sae-torch --sae-k $k \
        --out "$RUN/evaluate/ablation-sae-k$k" --threads "$THREADS" 2>&1 | tail -12
done
# Overcomplete's TopK SAE (sae, needs pip install 'gig[overcomplete]') against the hand-written one (sae-torch) at the same k.
gig evaluate "$RUN" --extraction-images 100 --interlayer-images 0 -m sae -m sae-torch \
    --out "$RUN/evaluate/sae-vs-overcomplete" --threads "$THREADS" 2>&1 | tail -12

#!/bin/bash
# `gig compare` on two models and on a model against its random-weight copy, same photos:
# EfficientNet-Lite0 (A) against Lite1 at the layers that end the same stages, and against Lite0
# with random weights; each run through decompose only (concepts and codes), one thread each.
#   bash bench/compare_lite.sh IMAGES OUT [N_IMAGES]
# e.g. bash bench/compare_lite.sh ../shared/data/imagenet-sample/labels.csv runs/cmp 200
set -euo pipefail
images=$(realpath "$1"); out=$2; n=${3:-200}
export OMP_NUM_THREADS=1
mkdir -p "$out"; cd "$out"
write() {  # NAME MODEL WEIGHTS LAYERS
  printf 'model: %s\nweights: %s\nimages: %s\nmax_images: %s\nlayers: %s\n' "$2" "$3" "$images" "$n" "$4" > "$1.yaml"
}
write lite0 efficientnet-lite0 default '["_blocks.4", "_blocks.8", "_blocks.11", "_blocks.15"]'
write lite1 efficientnet-lite1 default '["_blocks.6", "_blocks.11", "_blocks.15", "_blocks.20"]'
write lite0rand efficientnet-lite0 none '["_blocks.4", "_blocks.8", "_blocks.11", "_blocks.15"]'
for run in lite0 lite1 lite0rand; do
  for stage in collect concepts decompose; do gig "$stage" "$run" --config "$run.yaml" > "$run.$stage.log" 2>&1; done
done
gig compare lite0 lite1 --out lite0_lite1
gig compare lite0 lite0rand --out lite0_random

#!/bin/bash
# The benchmark configuration end to end, timed: `gig run` (collect → graph) with torchrun and one
# thread per process, then `gig report`; prints each part's wall seconds and the stages' own
# seconds from the run's manifest.
#   bash bench/end_to_end.sh IMAGES OUT [PROCESSES] [CONFIG]
# e.g. bash bench/end_to_end.sh ../shared/data/imagenet-sample/labels.csv runs/imagenet800 2
set -euo pipefail
images=$1; out=$2; procs=${3:-2}; config=${4:-bench/imagenet_sample.yaml}
export OMP_NUM_THREADS=1
start=$(date +%s)
torchrun --nproc_per_node="$procs" -m gig run --config "$config" --images "$images" --out "$out"
ran=$(date +%s)
gig report "$out"
done_=$(date +%s)
python - "$out" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
print("stages (s):", {k: v.get("seconds") for k, v in m["stages"].items()})
PY
echo "gig run: $((ran - start)) s; gig report: $((done_ - ran)) s; total: $((done_ - start)) s ($procs processes)"

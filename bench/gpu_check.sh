#!/usr/bin/env bash
# Prepared GPU check (under 8 minutes on one GPU): per-stage throughput of EfficientNet-Lite0 and
# ResNet-50, the GIG engine profiled (kernel share, host syncs per round, evaluations, 50 000-image
# projection), and CPU-vs-GPU agreement of GIG. Without a GPU: the same checks on the CPU at a tiny
# size, exit status 0.   bash bench/gpu_check.sh [--images N] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/gpu_check.py "$@"

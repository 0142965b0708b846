#!/usr/bin/env bash
# On one GPU or a TPU VM, in under 8 minutes: correctness against the xla path, then the
# attention benchmark (ours vs cuDNN / splash, fwd and fwd+bwd, T = 4K .. 128K, D = 64 / 128,
# GQA 4:1) and the model's train step with MFU. Every step has its own time limit, so the
# script ends in time even if one hangs; results go to $OUT (default benchmarks/results).
#
#   pip install -e '.[tpu]' or a CUDA jax, then:  bash benchmarks/device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
status=0
timeout 120 python benchmarks/device_check.py | tee "$out/device_check.txt" || status=1
timeout 150 python benchmarks/attention.py --lengths 4096,16384,65536,131072 --head-dims 128 \
    --repeats 3 --json "$out/attention_d128.json" | tee "$out/attention_d128.md" || status=1
timeout 60 python benchmarks/attention.py --lengths 4096,32768 --head-dims 64 \
    --repeats 3 --json "$out/attention_d64.json" | tee "$out/attention_d64.md" || status=1
timeout 120 python benchmarks/train.py --dtype bfloat16 --json "$out/train.json" \
    | tee "$out/train.md" || status=1
echo "results in $out (exit $status)"
exit $status

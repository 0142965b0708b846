#!/usr/bin/env bash
# On one GPU or a TPU VM, in under 8 minutes: correctness against the xla path, then the
# attention benchmark (ours vs cuDNN / splash, fwd and fwd+bwd, T = 4K .. 128K, D = 64 / 128,
# GQA 4:1) and the model's train step with MFU. Each measurement has its own time limit and
# the attention rows are written as they finish, so the script ends in time and keeps what it
# measured even if a long length hangs; results go to $OUT (default benchmarks/results).
#
#   pip install -e '.[test]' plus jax for the device (jax[cuda12] or jax[tpu]), then:
#   bash benchmarks/device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
status=0
attention() {  # name, then attention.py's arguments
    local name=$1; shift
    python benchmarks/attention.py --repeats 3 --json "$out/$name.jsonl" "$@" \
        | tee "$out/$name.md" || status=1
}
backend=$(python -c "import jax; print(jax.default_backend())")
vendor=$([ "$backend" = tpu ] && echo splash || echo cudnn)  # the library kernel beside ours
# Worst case, every limit reached: 60 + 10·12 + 6·25 + 10·8 + 60 s = 470 s.
timeout 60 python benchmarks/device_check.py | tee "$out/device_check.txt" || status=1
attention short_d128 --lengths 4096,16384 --head-dims 128 --child-timeout 12
attention long_d128 --lengths 65536,131072 --head-dims 128 --child-timeout 25 \
    --paths "fused,$vendor,reference"
attention d64 --lengths 4096,32768 --head-dims 64 --child-timeout 8
timeout 60 python benchmarks/train.py --dtype bfloat16 --json "$out/train.json" \
    | tee "$out/train.md" || status=1
echo "results in $out (exit $status)"
exit $status

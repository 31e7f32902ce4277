#!/usr/bin/env bash
# The GPU tables of benchmarks/README.md in one go (issues 10 and 13), each benchmark under its own time limit so
# that one slow case cannot eat the others' time. Written for a lent GPU machine whose python3 already has torch,
# torchvision, transformers and timm; what it lacks (hydra-core, omegaconf, antlr4-python3-runtime, webdataset,
# braceexpand, lpips, vector-quantize-pytorch and its needs) travels as wheels in .whl (see
# /work/.library/device/README.md) and goes to /tmp/site.
#
#     bash benchmarks/gpu.sh [OUT]        # tables to OUT (default $OUT, else ./gpu-tables), one file per benchmark
#
# About 9 minutes on one H200: the quick cases first, the codebook grid last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-tables}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"

run() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($*)"
    timeout "$limit" "$@" >"$out/$name.txt" 2>"$out/$name.err" || echo "   $name ended with status $?"
    grep -E '^\||^machine' "$out/$name.txt" || tail -5 "$out/$name.err"
}

run vq_speed 60 python3 benchmarks/vq_speed.py --device cuda --dtype bf16
run encoder_share 45 python3 benchmarks/encoder_share.py --device cuda --dtype bf16
run pipeline 120 python3 benchmarks/pipeline.py --device cuda --model dinov2_b --images 4096
run throughput 120 python3 benchmarks/throughput.py --device cuda --compile
run codebook_quality 180 python3 benchmarks/codebook_quality.py --device cuda --k 4096,16384,65536 --batch 8192 \
    --steps 400 --fit-tokens 262144 --held-out 65536

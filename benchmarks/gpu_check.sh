#!/usr/bin/env bash
# One script for a bare CUDA machine that has torch but no package index (the device tool's machines):
# installs the project's missing dependencies from wheels carried in .whl/, runs the GPU-marked tests
# and the CUDA overhead benchmark, and writes results to $OUT (default gpu-results/), within 8 minutes.
#   prepare here (README "Benchmarks"):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 importlib_metadata
#   then run it there with .whl carried:  bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
start=$(date +%s)
source "$(dirname "$0")/_device_env.sh"
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
# the GPU tests (tests/test_gpu.py: fp16/bf16, side-stream copies, sync debug mode, a real OOM, inductor compile)
timeout 180 python3 -m pytest -q -p no:cacheprovider -rs --durations=0 tests/test_gpu.py -o addopts="" 2>&1 \
  | tee "$OUT/gpu-tests.txt" | tail -40
# the CUDA benchmark: shapes, SD 1.5 512 px 50 steps (+ ControlNet), SDXL 1024 px 30 steps, float16;
# its JSON is rewritten after each model, so a time limit keeps what was measured
timeout 270 python3 benchmarks/overhead.py --device cuda --repeats 3 --json "$OUT/overhead-cuda.json" 2>&1 \
  | tee "$OUT/overhead-cuda.txt" | grep -v "^ " | tail -20
echo "gpu_check: $(( $(date +%s) - start )) s" | tee -a "$OUT/device.txt"

#!/usr/bin/env bash
# One script for a bare CUDA machine that has torch but no package index (the device tool's machines):
# installs the project's missing dependencies from wheels carried in .whl/, runs the GPU-marked tests
# and the CUDA overhead benchmark, and writes results to $OUT (default gpu-results/).
#   prepare here:  see README "GPU check" (pip download ... -d .whl diffusers==0.42.1 importlib_metadata)
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -o addopts="" 2>&1 | tee "$OUT/gpu-tests.txt"
timeout 240 python3 benchmarks/overhead.py --device cuda --repeats 5 --json "$OUT/overhead-cuda.json" 2>&1 | tail -40

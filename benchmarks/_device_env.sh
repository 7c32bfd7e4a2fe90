# Sourced by the device-machine scripts (gpu_check.sh, gpu_train.sh): installs the wheels carried in .whl/
# (a bare CUDA machine has torch but no package index) and sets PYTHONPATH and the offline flags.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

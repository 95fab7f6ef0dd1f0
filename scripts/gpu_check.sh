#!/usr/bin/env bash
# Run meshray's real-GPU checks on a GPU machine that cannot reach a package
# index: installs the carried wheels (.whl/, see docs/gpus.md) into /tmp/site,
# then runs the GPU test files. Output goes to $OUT (or ./gpu-check-out).
set -u
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
{
  echo "== nvidia-smi"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  echo "== python"; python3 --version; python3 -c "import grpc, google.protobuf, torch; print('grpc', grpc.__version__, 'protobuf', google.protobuf.__version__, 'torch', torch.__version__)"
  echo "== real GPU tests"
  python3 -m pytest -v -p no:cacheprovider -o addopts="" tests/integration/test_gpu_real.py -s
  echo "rc=$?"
  echo "== fake-NVML GPU tests (same code paths, faked devices)"
  python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/integration/test_gpus.py
  echo "rc=$?"
} 2>&1 | tee "$out/gpu-check.log"

#!/usr/bin/env bash
# The project's GPU check in one run, for a CUDA machine lent for a few minutes: the
# `gpu`-marked tests, then the GPU targets of issue 12 side by side (bench/gpu_targets.py).
#
# The machine has PyTorch but not the service's other wheels, and none of ../shared.
# Prepare once, here, from the project root (.gpu/ is ignored by git; it travels with
# `carry: [".gpu"]`):
#   echo /.gpu/ >> .git/info/exclude
#   mkdir -p .gpu/datasets && cp -r ../shared/gpu ../shared/weights .gpu/ \
#     && cp -r ../shared/datasets/Set5 ../shared/datasets/Set14 .gpu/datasets/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .gpu/extra isal simplejpeg fastapi-offline httpx \
#     httpcore h11 certifi idna sniffio tqdm pyyaml
# Then, on the device: `bash bench/gpu_check.sh` (about 6 minutes; outputs in $OUT or
# /tmp/gpu_out). Try it here first: on the CPU the tests skip and --quick runs.
set -u
O=${OUT:-/tmp/gpu_out}
mkdir -p "$O"
ROOT=$PWD
S=$ROOT/.gpu
if [ -d "$S/gpu/wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$S"/gpu/wheels/*.whl "$S"/extra/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$ROOT
fi
export PYTHONUNBUFFERED=1 IMDN_SHARED_DIR=${IMDN_SHARED_DIR:-$S}
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' | tee "$O/device.txt"
quick=()
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || quick=(--quick)
# the gpu tests (fp16 and compiled PSNR within 0.02 dB of fp32, modes, tiles): ~3 min
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$O/gpu_tests.txt"
# the targets, eager then compiled (the compile takes minutes the first time)
timeout 150 python3 -m bench.gpu_targets "${quick[@]}" --json 2>&1 | tee "$O/targets.txt"
timeout 200 python3 -m bench.gpu_targets "${quick[@]}" --compile --skip-http 2>&1 \
  | tee "$O/targets_compiled.txt"

#!/usr/bin/env bash
# Downloads the wheels scripts/gpu_check.sh installs on the GPU machine, which has no network and
# lacks diffusers, k-diffusion and torchsde (and their small dependencies): into .whl/
# (git-ignored), for CPython 3.12 on x86-64 Linux, without their dependency trees (only these).
# The versions are the ones this checkout's tests run with (pyproject's test extra, the Makefile).
#
#   scripts/gpu_wheels.sh                 # into .whl/
#   PYTHON=python3 WHL=/tmp/w scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHL=${WHL:-.whl}
mkdir -p "$WHL"
PACKAGES=(
    diffusers==0.42.1 k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2
    torchdiffeq==0.2.5
    # diffusers' imports beyond what the GPU machine has (numpy, pillow, safetensors, tqdm)
    huggingface_hub==2.4.0 importlib_metadata==10.2.0 zipp==4.1.2 filelock==4.3.1
    fsspec==2026.9.0 packaging==26.4 PyYAML==6.0.4 regex==2026.11.19 requests==2.34.2
    urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3
    typing_extensions==4.16.0 hf-xet==1.8.0
)
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    --dest "$WHL" "${PACKAGES[@]}"
ls -1 "$WHL"

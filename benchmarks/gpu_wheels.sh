#!/usr/bin/env bash
# The GPU machines have no pydantic (the core needs it) and no network. Run this HERE, then pass `carry: [".whl"]`
# to the device tool and, there, unpack the wheels onto PYTHONPATH:
#   mkdir -p /tmp/pp && for w in .whl/*.whl; do python -m zipfile -e $w /tmp/pp; done
#   export PYTHONPATH=core:.:/tmp/pp
# (.whl/ stays out of git: add `/.whl/` to .git/info/exclude.)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --implementation cp -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection
# The HTTP server (benchmarks/serve_bench.py, tests of the server): FastAPI + uvicorn (with its C event loop and
# HTTP parser, as `pip install .[server]` gets them) + prometheus-client, and their dependencies.
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --implementation cp -d .whl "fastapi>=0.110" "uvicorn>=0.29" uvloop httptools "prometheus-client>=0.20" \
  pydantic==2.14.4 pydantic_core==2.50.5
# xgrammar for guided decoding (forced tool calls, guided_overhead.py); its other needs (torch, transformers,
# triton, numpy) are on the image.
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --implementation cp --no-deps -d .whl xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
ls .whl

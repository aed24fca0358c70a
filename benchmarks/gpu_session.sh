#!/usr/bin/env bash
# One device call of a measuring session on a lent GPU machine, from the repo root, results under $OUT:
#   bash benchmarks/gpu_session.sh check    # tests/gpu, host work per step, an engine smoke run
#   bash benchmarks/gpu_session.sh serve    # bench.py (8B shape, FP8 + FP8 KV), serving under load
#   bash benchmarks/gpu_session.sh extra    # guided host cost, INT4, FP8 build, HTTP server
#   bash benchmarks/gpu_session.sh tests    # tests/gpu only, 4 workers (pytest-xdist is on the image); -v, so a
#                                           # time-out still leaves the name of every test that ran
# Needs `carry: [".whl", ".tok"]` (benchmarks/gpu_wheels.sh; .tok = SmolLM2's tokenizer files, for JSON tokens).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/pp
for w in .whl/*.whl; do python -m zipfile -e "$w" /tmp/pp; done
export PYTHONPATH=core:.:/tmp/pp
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
WORK=/tmp/onv_bench; mkdir -p $WORK
ckpt8b() {  # the Llama-3-8B-shaped random checkpoint, with SmolLM2's tokenizer (real JSON tokens)
  python -c "import sys; sys.path.insert(0, 'benchmarks'); from checkpoint import write_checkpoint; write_checkpoint('llama-3-8b', '$WORK/llama-3-8b')"
  mkdir -p $WORK/llama-3-8b-tok && cp -r $WORK/llama-3-8b/* $WORK/llama-3-8b-tok/ 2>/dev/null; cp .tok/* $WORK/llama-3-8b-tok/
}
case "$1" in
check)
  timeout 300 python -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/tests-gpu.log" | tail -40
  timeout 90 python benchmarks/host_overhead.py --device cuda --seqs 1,256,1024 --steps 30 --out "$OUT/host-overhead.json" 2>&1 | tail -15
  ;;
tests)
  timeout ${TESTS_TIMEOUT:-170} python -m pytest tests/gpu -v -p no:cacheprovider -n 4 -rfE --durations=15 \
    --junitxml="$OUT/tests-gpu.xml" 2>&1 | tee "$OUT/tests-gpu.log" | tail -40
  ;;
serve)
  ckpt8b
  timeout 330 python benchmarks/bench.py --runs llama-3-8b:fp8kv --weight-rounding nearest --long \
    --work-dir $WORK --results-dir "$OUT" 2>&1 | grep -v Warn | tail -30
  OPTS='{"use_fp8": true, "kv_cache_dtype": "fp8", "weight_rounding": "nearest"}'
  timeout 200 python benchmarks/serving.py --model $WORK/llama-3-8b-tok --device cuda --sections gil,tools \
    --concurrency 64 --engine-options "$OPTS" --out "$OUT/serving-64.json" 2>&1 | grep -v Warn | tail -5
  timeout 120 python benchmarks/serving.py --model $WORK/llama-3-8b-tok --device cuda --sections latency \
    --concurrency 64 --prompt-len 1024 --out-len 256 --engine-options "$OPTS" --out "$OUT/serving-latency.json" 2>&1 | grep -v Warn | tail -3
  ;;
extra)
  ckpt8b
  timeout 120 python benchmarks/guided_overhead.py --device cuda --tokenizer .tok --out "$OUT/guided-overhead.json" 2>&1 | tail -5
  timeout 200 python benchmarks/int4_bench.py --out "$OUT/int4.json" 2>&1 | tail -10
  timeout 240 python benchmarks/build_bench.py --out "$OUT/build.json" 2>&1 | tail -10
  ;;
esac
ls -la "$OUT"

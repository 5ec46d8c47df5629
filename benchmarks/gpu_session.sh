#!/usr/bin/env bash
# One short session on a machine with an NVIDIA GPU: the GPU benchmarks,
# then the whole test suite with device="auto" choosing the GPU.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [BENCH_SECONDS] [TEST_SECONDS] [GPU_TEST_SECONDS]
#
# Writes OUT_DIR/gpu.txt (the card, driver and library versions),
# OUT_DIR/gpu_tests.log (the tests that need a GPU, run first),
# OUT_DIR/gpu/results.json and results.md (the benchmark section "gpu", as
# `python -m benchmarks --device cuda --only gpu` writes them), the profile
# of a short bf16 fit, OUT_DIR/bench.log and OUT_DIR/tests.log. Each stage
# has its own time limit, so that a slow stage leaves the other's output.
# On an H200 (2026-11-26, two runs): the GPU tests 59 and 82 s, the section
# 146 and 155 s, the whole suite with 8 workers 191 s; the machine's start
# about 36 s. `gpu_session.sh OUT 170 240` took 419 s (the call's
# timeout_s about 560 leaves room); with 15 minutes of device time a
# session can then afford only a short second run (`OUT 170 60` took 335 s).
# Since then the first step of a shape times the mask and residual kernels
# in 9 and 6 launches, each a Triton compilation in a process's first fit:
# the GPU tests' stage gets 150 s by default, and `OUT 170 200` keeps the
# whole within a call's 600 s. On 2026-11-27 (H200) `OUT 170 200` took 456
# s: the GPU tests 88 s, the section 163 s, the whole suite 180 s (1,290
# tests, 8 workers); with the machine's start, 490 s of the 900 s of device
# time, which left one short second call (about 230 s).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR [BENCH_SECONDS] [TEST_SECONDS] [GPU_TEST_SECONDS]}
bench_s=${2:-300}
test_s=${3:-240}
gpu_test_s=${4:-150}
mkdir -p "$out/gpu"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$py" - <<'EOF'
import platform, numpy, scipy, sklearn, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "numpy", numpy.__version__, "scipy", scipy.__version__, "sklearn", sklearn.__version__)
print("device", torch.cuda.get_device_name(), "cpus", __import__("os").cpu_count())
EOF
} 2>&1 | tee "$out/gpu.txt"

# The console script `sparse-dict` for the CLI tests, without the network.
"$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
    || echo "editable install failed (see install.log); the package is on PYTHONPATH"

# The tests of what only a GPU runs, first and on their own (about a
# minute): the kernels against torch, the feeds, a fit on the GPU; and
# sparse_step's two paths, whose dense one decides the step's kernels on a
# GPU (it caught a wrong first step there, 2026-11-26).
# And the pass's figures read a pass late from pinned memory
# (test_torch_core's cuda cases, added 2026-11-27 without a GPU).
echo "== GPU tests (limit ${gpu_test_s} s)"
timeout -s INT -k 20 "$gpu_test_s" "$py" -m pytest -q -rfE -p no:cacheprovider \
    tests/test_fused.py tests/test_pipeline.py tests/test_estimator.py tests/test_torch_core.py \
    -k "gpu or cuda or sparse_step_parameter or buffers_are_reused" 2>&1 \
    | tee "$out/gpu_tests.log" | tail -30
echo "GPU tests exit: $?"

echo "== benchmarks (limit ${bench_s} s)"
timeout "$bench_s" "$py" -m benchmarks --device cuda --only gpu --quick --out "$out/gpu" \
    2>&1 | tee "$out/bench.log"
echo "benchmarks exit: $?"

echo "== tests (limit ${test_s} s)"
workers=$(( $(nproc) / 2 ))
# SIGINT at the limit: pytest then still names the failures so far (a plain
# kill at 185 s on the H200 cut the log before its summary).
timeout -s INT -k 20 "$test_s" "$py" -m pytest -q -rfE --durations=15 -p no:cacheprovider \
    -n "$workers" \
    tests 2>&1 | tee "$out/tests.log" | tail -60
echo "tests exit: $?"
# At most eight files come back from a lent machine: these two are the least
# use, the partial figures only once the whole section's are written (a
# section stopped by its limit leaves them alone).
rm -f "$out/install.log"
if [ -f "$out/gpu/results.json" ]; then rm -f "$out/gpu/gpu_partial.json"; fi

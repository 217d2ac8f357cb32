#!/usr/bin/env bash
# One-command GPU suite: install, build, GPU tests, benchmarks, summary. For a fresh GPU
# machine with no network (torch, triton, pytest, matplotlib already there).
#
#   benchmarks/gpu_suite.sh OUT_DIR [BENCH_MINUTES]
#
# Writes into OUT_DIR: env.txt (versions, nvidia-smi), install.log, tests.log + tests.xml,
# bench.log, results.json / results.md / summary.md / *.png (ccam-bench), suite.log (step
# timings), and SUITE.md, the short report, rewritten after every step. BENCH_MINUTES (default 5) is ccam-bench's time budget:
# repeats shrink to fit it and cases past it become "skipped" rows; a hard limit of 90 s more
# stops a run that overruns (its finished cases are on disk). Worst case: install 60 s (build
# 420 s when csrc/ has kernels) + tests 150 s + bench 390 s; without a CUDA build the whole
# call ends within 10 minutes, usually within 8. CCAM_SUITE_BENCH_ARGS replaces the benchmark sweep and
# CCAM_SUITE_SKIP_INSTALL=1 skips the install, CCAM_SUITE_REQUIRE_GPU=0 the GPU check (all
# three for the CPU test of this script);
# CCAM_GPU_TEST_SECONDS (default 150) limits the tests; MAX_JOBS (default 16) the build. Every step runs even if an earlier one failed (a failing test does
# not hide the benchmark numbers); the exit status is that of the first failed step.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [BENCH_MINUTES]}
MINUTES=${2:-5}
TEST_SECONDS=${CCAM_GPU_TEST_SECONDS:-150}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # resolved against the caller's directory, before the cd below
cd "$(dirname "$0")/.."
T0=$(date +%s)
STATUS=0
STEPS=()

say() { echo "[gpu-suite +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/suite.log" >&2; }
report() {  # SUITE.md, rewritten after every step: a call cut short still leaves one
  {
    echo "# GPU suite"
    echo
    sed -n '1,7p' "$OUT/env.txt" 2>/dev/null | sed 's/^/    /'
    echo
    echo "| step | outcome | at |"
    echo "|---|---|---|"
    printf '%s\n' "${STEPS[@]}"
    echo
    if [ -f "$OUT/tests.log" ]; then
      echo "Tests: $(grep -Eo '[0-9]+ (passed|failed|skipped|error)[^=]*' "$OUT/tests.log" | tail -n 1)"
      echo
    fi
    if [ -f "$OUT/summary.md" ]; then cat "$OUT/summary.md"; else echo "(no benchmark summary yet: see bench.log)"; fi
  } > "$OUT/SUITE.md"
}
step() {  # step NAME RC
  STEPS+=("| $1 | $([ "$2" -eq 0 ] && echo ok || echo "FAILED (exit $2)") | $(( $(date +%s) - T0 )) s |")
  if [ "$2" -ne 0 ] && [ "$STATUS" -eq 0 ]; then STATUS=$2; fi
  say "$1: exit $2"
  report
}

# 1. What machine and software this is.
{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')"
  python - <<'EOF'
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
else:
    print("gpu: torch sees no CUDA device")
EOF
  echo "C compiler (Triton needs one): $(command -v gcc || command -v cc || echo NONE)"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
} > "$OUT/env.txt" 2>&1
say "environment written to env.txt"

# 2. Install (no build isolation, no dependencies: the machine has no network). The CUDA
#    extension is built, and must build, when csrc/ holds kernels.
if find csrc -name '*.cu' 2>/dev/null | grep -q .; then export CCAM_BUILD_CUDA=1; else export CCAM_BUILD_CUDA=0; fi
export MAX_JOBS=${MAX_JOBS:-16}
if [ "${CCAM_SUITE_SKIP_INSTALL:-0}" = 1 ]; then
  say "install skipped (CCAM_SUITE_SKIP_INSTALL=1)"
else
  say "installing (CCAM_BUILD_CUDA=$CCAM_BUILD_CUDA) ..."
  timeout "$([ "$CCAM_BUILD_CUDA" = 1 ] && echo 420 || echo 60)" \
    python -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1
  step "install (CCAM_BUILD_CUDA=$CCAM_BUILD_CUDA)" $?
fi
python -c "import ccam_kernels; print('usable backends:', ccam_kernels.available_backends())" >> "$OUT/env.txt" 2>&1

# 3. The GPU tests (marked gpu, and the Triton kernels' tests, compiled there), with a hard time limit. Without a visible GPU they would all
#    skip and pass: that is a failed step here, not a green one.
if [ "${CCAM_SUITE_REQUIRE_GPU:-1}" = 1 ]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
  step "torch sees a CUDA device" $?
fi
say "GPU tests (limit ${TEST_SECONDS} s) ..."
timeout "$TEST_SECONDS" python -m pytest -q -m "gpu or triton" tests --junitxml="$OUT/tests.xml" \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1
step "GPU tests (pytest -m 'gpu or triton')" $?
tail -n 3 "$OUT/tests.log" | sed 's/^/    /' >&2

# 4. The benchmark suite: our backends and every anchor, the ceilings measured in the run.
say "benchmarks (budget ${MINUTES} min) ..."
BENCH_ARGS=${CCAM_SUITE_BENCH_ARGS:-"--device cuda --bench attention,projector --pass fwd,fwd+bwd,bwd --frames 96,16,64,32 --batch 1,8 --ragged 16,96,33,64"}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
HARD_LIMIT=$(awk -v m="$MINUTES" 'BEGIN { printf "%d", m * 60 + 90 }')
timeout "$HARD_LIMIT" python -m ccam_kernels.bench $BENCH_ARGS \
  --max-minutes "$MINUTES" --out "$OUT" > "$OUT/bench.log" 2>&1
step "ccam-bench" $?

# 5. The short report.
report
say "done in $(( $(date +%s) - T0 )) s; report: $OUT/SUITE.md"
exit "$STATUS"

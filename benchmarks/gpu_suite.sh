#!/usr/bin/env bash
# One-command GPU suite: install, build, GPU tests, benchmarks, summary. For a fresh GPU
# machine with no network (torch, triton, pytest, matplotlib already there).
#
#   benchmarks/gpu_suite.sh OUT_DIR [BENCH_MINUTES]
#
# Writes into OUT_DIR: env.txt (versions, nvidia-smi), install.log, tests.log + tests.xml,
# sanitizer.log, bench.log, results.json / results.md / summary.md / *.png (ccam-bench),
# suite.log (step timings), and SUITE.md, the short report, rewritten after every step.
#
# Time: the whole call ends within CCAM_SUITE_SECONDS (default 540, inside the device tool's
# 10-minute limit). Install 60 s (240 s when csrc/ has kernels: the CUDA extension is built),
# GPU tests CCAM_GPU_TEST_SECONDS (default 150), compute-sanitizer memcheck + racecheck on a
# small case of the cuda backend (60 s each, when the extension and the tool are there), then
# the benchmarks get what is left: BENCH_MINUTES (default 5) or less, as ccam-bench's budget
# (repeats shrink, then cases become "skipped" rows), with a hard stop 90 s later (finished
# cases are on disk). CCAM_SUITE_BENCH_ARGS replaces the benchmark sweep,
# CCAM_SUITE_SKIP_INSTALL=1 skips the install, CCAM_SUITE_REQUIRE_GPU=0 the GPU check (all
# three for the CPU test of this script); MAX_JOBS (default 16) limits the build. Every step
# runs even if an earlier one failed (a failing test does not hide the benchmark numbers);
# the exit status is that of the first failed step.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [BENCH_MINUTES]}
MINUTES=${2:-5}
TEST_SECONDS=${CCAM_GPU_TEST_SECONDS:-150}
SUITE_SECONDS=${CCAM_SUITE_SECONDS:-540}
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
  timeout "$([ "$CCAM_BUILD_CUDA" = 1 ] && echo 240 || echo 60)" \
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
# With a CUDA build, the cuda backend's tests must run: a skip (extension missing) fails them.
CCAM_REQUIRE_CUDA_BACKEND=$CCAM_BUILD_CUDA timeout "$TEST_SECONDS" python -m pytest -q -m "gpu or triton" tests --junitxml="$OUT/tests.xml" \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1
step "GPU tests (pytest -m 'gpu or triton')" $?
tail -n 3 "$OUT/tests.log" | sed 's/^/    /' >&2

# 4. compute-sanitizer on a small case of the cuda backend (every tile cut short): memcheck
#    without the caching allocator (each tensor its own allocation), then racecheck.
if [ "$CCAM_BUILD_CUDA" = 1 ] && command -v compute-sanitizer > /dev/null; then
  : > "$OUT/sanitizer.log"
  for tool in memcheck racecheck; do
    say "compute-sanitizer --tool $tool ..."
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 1 \
      python benchmarks/sanitize_case.py >> "$OUT/sanitizer.log" 2>&1
    step "compute-sanitizer $tool (cuda backend)" $?
  done
elif [ "$CCAM_BUILD_CUDA" = 1 ]; then
  say "compute-sanitizer not found: sanitizer step not run"
  STEPS+=("| compute-sanitizer | not run: the tool is not on the PATH | $(( $(date +%s) - T0 )) s |")
fi

# 5. The benchmark suite: our backends and every anchor, the ceilings measured in the run,
#    in the time left (the hard stop ends the call inside SUITE_SECONDS).
LEFT=$(( SUITE_SECONDS - ($(date +%s) - T0) - 20 ))
MINUTES=$(awk -v m="$MINUTES" -v left="$LEFT" 'BEGIN { b = (left - 90) / 60; if (b > m) b = m; if (b < 0.5) b = 0.5; printf "%.1f", b }')
say "benchmarks (budget ${MINUTES} min, ${LEFT} s left) ..."
BENCH_ARGS=${CCAM_SUITE_BENCH_ARGS:-"--device cuda --bench attention,projector --pass fwd,fwd+bwd,bwd --frames 96,16,64,32 --batch 1,8 --ragged 16,96,33,64"}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
HARD_LIMIT=$(awk -v m="$MINUTES" 'BEGIN { printf "%d", m * 60 + 90 }')
timeout "$HARD_LIMIT" python -m ccam_kernels.bench $BENCH_ARGS \
  --max-minutes "$MINUTES" --out "$OUT" > "$OUT/bench.log" 2>&1
step "ccam-bench" $?

# 6. The short report.
report
say "done in $(( $(date +%s) - T0 )) s; report: $OUT/SUITE.md"
exit "$STATUS"

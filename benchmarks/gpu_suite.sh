#!/usr/bin/env bash
# The GPU suite: one call on a lent GPU machine (no network; torch, triton, pytest there) that
# builds, checks and measures, within a total deadline, and leaves three files:
#
#   benchmarks/gpu_suite.sh OUT_DIR
#
#   OUT_DIR/SUITE.md      the report: machine, each step's limit and outcome, the smoke table,
#                         the fastest backend of each benchmark row, test counts; what to commit
#   OUT_DIR/results.json  the benchmark rows (ccam-bench's format; the suite's runs merged)
#   OUT_DIR/logs.tar.gz   every log, plot and test report (env.txt, build.log, smoke.log,
#                         bench-*/ with ccam-bench's outputs, tests*.log/xml, sanitizer logs)
#
# All three are rewritten after every step, so a call cut short still brings back what ran.
# Steps, in the order a first contact with a GPU needs them (each under `timeout`, its limit
# the smaller of its cap and what is left before the deadline; a step with too little time
# left is reported as not run):
#   env        versions, GPU, the one architecture to build (benchmarks/suite_env.py)
#   build      pip install -e . with the CUDA extension for that architecture only
#   memcheck   compute-sanitizer memcheck and racecheck on a small case of every kernel (cuda:
#   racecheck  forward, split forward, dQ, dK/dV; triton: the same) (benchmarks/sanitize_case.py)
#   smoke      every backend at the v1.2 shape, forward and backward (benchmarks/smoke.py)
#   tests      tests/test_gpu.py and tests/test_cuda.py
#   prewarm    the Triton kernels compiled and tuned for the timed shape classes (benchmarks/prewarm.py)
#   bench-attention  attention fwd, bwd at 96 and 16 frames, B 1 and 8, every contestant but
#              FlexAttention (its recompiles cost 15 s per shape)
#   bench-flex FlexAttention at one shape (96 frames, B 1)
#   results    merge the bench runs, table the winners, and the performance model's prediction
#              next to each measured row (benchmarks/suite_table.py)
#   bench-projector  projector fwd, fwd+bwd at 96 frames (no FlexAttention), if time is left
#   triton     the triton-marked tests, compiled on the GPU, in what time is left
# Every step runs even if an earlier one failed (a failing test does not hide the benchmark
# numbers); the exit status is that of the first failed step.
#
# Settings (environment): CCAM_SUITE_SECONDS total deadline (default 280, so a device call
# with timeout_s=300 and the machine's start fit in 6 minutes, and a rerun in the 15
# device-minutes); CCAM_SUITE_DRY_RUN=1 prints the
# plan (each step's limit if every step before it used its whole limit) and runs nothing;
# CCAM_SUITE_PYTHON the interpreter (default python3); CCAM_SUITE_SKIP_INSTALL=1 skips the build (a warm machine that has it); MAX_JOBS (default
# 16) parallel compiles.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
BUDGET=${CCAM_SUITE_SECONDS:-280}
DRY=${CCAM_SUITE_DRY_RUN:-0}
GRACE=5  # after its limit a step gets TERM, and KILL this much later
# Kept free at the end for the last report and archive and a killed step's grace; and the
# least time worth starting a step with. Both scale down for short budgets (the CPU test).
RESERVE=$(( BUDGET / 20 )); (( RESERVE > 20 )) && RESERVE=20; (( RESERVE < 2 )) && RESERVE=2
MIN_STEP=$(( BUDGET / 40 )); (( MIN_STEP < 1 )) && MIN_STEP=1

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # resolved against the caller's directory, before the cd below
cd "$(dirname "$0")/.."
# Every step imports this tree's ccam_kernels (the env step runs before the install).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The image's python3 holds torch; CCAM_SUITE_PYTHON names another interpreter.
PYTHON=${CCAM_SUITE_PYTHON:-$(command -v python3 || command -v python || echo python3)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ccam-gpu-suite.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SECONDS=0
SIM=0  # the dry run's clock
HOLD=0  # seconds a step leaves to the steps after it (the benchmarks leave the merge its time)
STATUS=0
STEPS=()

elapsed() { if [ "$DRY" = 1 ]; then echo "$SIM"; else echo "$SECONDS"; fi; }
say() { [ "$DRY" = 1 ] || echo "[gpu-suite +${SECONDS}s] $*" | tee -a "$WORK/suite.log" >&2; }

# run_step NAME CAP LOG COMMAND...: run COMMAND under its limit, output to $WORK/LOG; sets RC
# (-1 when not run) and LIMIT.
run_step() {
  local name=$1 cap=$2 log=$3 start outcome
  shift 3
  LIMIT=$(( BUDGET - RESERVE - HOLD - $(elapsed) ))
  (( LIMIT > cap )) && LIMIT=$cap
  if (( LIMIT < MIN_STEP )); then
    skip_step "$name" "not run: $(( LIMIT < 0 ? 0 : LIMIT )) s left before the deadline"
    return
  fi
  if [ "$DRY" = 1 ]; then
    SIM=$(( SIM + LIMIT + GRACE ))
    printf 'step %-16s limit %4d s (cap %4d s), done by %4d s at the latest\n' "$name" "$LIMIT" "$cap" "$SIM"
    RC=0
    return
  fi
  say "$name (limit ${LIMIT} s): $*"
  start=$SECONDS
  timeout --kill-after="$GRACE" "$LIMIT" "$@" > "$WORK/$log" 2>&1
  RC=$?
  case $RC in
    0) outcome=ok ;;
    124 | 137) outcome="TIMED OUT (limit ${LIMIT} s)" ;;
    *) outcome="FAILED (exit $RC)" ;;
  esac
  if [ "$RC" -ne 0 ] && [ "$STATUS" -eq 0 ]; then STATUS=$RC; fi
  STEPS+=("| $name | $LIMIT | $outcome | $(( SECONDS - start )) | $SECONDS |")
  say "$name: $outcome"
  publish
}

skip_step() {  # skip_step NAME WHY
  RC=-1
  if [ "$DRY" = 1 ]; then printf 'step %-16s %s\n' "$1" "$2"; return; fi
  STEPS+=("| $1 | - | $2 | - | $SECONDS |")
  say "$1: $2"
  publish
}

summary() {  # summary LOG PATTERN: the last line of LOG matching PATTERN (a tool's verdict)
  if [ ! -f "$WORK/$1" ]; then echo "not run"; return; fi
  grep -E "$2" "$WORK/$1" | tail -n 1 | grep . || echo "no summary line (see $1)"
}

publish() {  # SUITE.md and logs.tar.gz in OUT, rewritten after every step (atomically)
  {
    echo "# GPU suite"
    echo
    sed -n '1,6p' "$WORK/env.txt" 2>/dev/null | sed 's/^/    /'
    echo
    echo "Deadline ${BUDGET} s; ${SECONDS} s so far; exit status so far ${STATUS}."
    echo
    echo "| step | limit s | outcome | took s | at s |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${STEPS[@]}"
    echo
    echo "## Correctness smoke (v1.2 shape)"
    echo
    if [ -f "$WORK/smoke.log" ]; then grep -E '^(\||Smoke|cuda:|triton:|torch:|no backend)' "$WORK/smoke.log"; else echo "(not run yet)"; fi
    echo
    echo "## Benchmarks: the fastest backend of each row"
    echo
    if [ -f "$WORK/winners.md" ]; then cat "$WORK/winners.md"; else echo "(no results yet: see bench-*.log)"; fi
    echo
    echo "## Predicted (performance model, python -m ccam_kernels.perf_model) next to measured"
    echo
    if [ -f "$WORK/predicted.md" ]; then cat "$WORK/predicted.md"; else echo "(no results yet)"; fi
    echo
    echo "## Tests"
    echo
    echo "- tests/test_gpu.py, tests/test_cuda.py: $(summary tests.log '[0-9]+ (passed|failed|error|skipped)')"
    echo "- compute-sanitizer: memcheck $(summary sanitizer-memcheck.log 'ERROR SUMMARY'); racecheck $(summary sanitizer-racecheck.log 'ERROR SUMMARY|RACECHECK SUMMARY')"
    echo "- triton-marked tests: $(summary tests-triton.log '[0-9]+ (passed|failed|error|skipped)')"
    echo
    echo "Every log, plot and test report is in logs.tar.gz."
  } > "$OUT/SUITE.md.tmp" && mv "$OUT/SUITE.md.tmp" "$OUT/SUITE.md"
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

if [ "$DRY" = 1 ]; then
  echo "plan: deadline ${BUDGET} s, ${RESERVE} s kept for the report, steps need at least ${MIN_STEP} s, kill grace ${GRACE} s"
fi

# 1. The machine, and the one architecture to build.
run_step env 20 env-step.log "$PYTHON" benchmarks/suite_env.py "$WORK/env.txt"
ARCH=$( [ -f "$WORK/env.txt" ] && grep -o 'build arch [0-9a-z]*' "$WORK/env.txt" | awk '{print $3}')

# 2. Build: install without network, the CUDA extension when csrc/ holds kernels.
CUDA_WANTED=0
if find csrc -name '*.cu' 2>/dev/null | grep -q .; then CUDA_WANTED=1; fi
CUDA_BUILT=0
if [ "${CCAM_SUITE_SKIP_INSTALL:-0}" = 1 ]; then
  skip_step build "skipped (CCAM_SUITE_SKIP_INSTALL=1)"
  CUDA_BUILT=$CUDA_WANTED
else
  run_step build 120 build.log env CCAM_BUILD_CUDA="$CUDA_WANTED" ${ARCH:+CCAM_CUDA_ARCHS="$ARCH"} MAX_JOBS="${MAX_JOBS:-16}" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
  if [ "$RC" = 0 ]; then CUDA_BUILT=$CUDA_WANTED; fi
fi

# 3. compute-sanitizer on a small case of every kernel, before anything else runs them:
#    memcheck without the caching allocator (each tensor its own allocation, so an access
#    past one is seen), then racecheck.
SANITIZE=triton
if [ "$CUDA_BUILT" = 1 ]; then SANITIZE=cuda,triton; fi
if [ "$DRY" != 1 ] && ! command -v compute-sanitizer > /dev/null; then
  skip_step sanitizer "not run: compute-sanitizer is not on the PATH"
else
  run_step memcheck 30 sanitizer-memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" benchmarks/sanitize_case.py --backends "$SANITIZE"
  run_step racecheck 40 sanitizer-racecheck.log \
    compute-sanitizer --tool racecheck --error-exitcode 1 "$PYTHON" benchmarks/sanitize_case.py --backends "$SANITIZE"
fi

# 4. Correctness: the smoke at the v1.2 shape (the backends the suite measures must be
#    usable), then the GPU tests. With a CUDA build, the cuda backend's tests must run: a skip
#    (extension missing) fails them.
REQUIRE=torch,triton
if [ "$CUDA_BUILT" = 1 ]; then REQUIRE=$REQUIRE,cuda; fi
run_step smoke 30 smoke.log "$PYTHON" benchmarks/smoke.py --require "$REQUIRE" --json "$WORK/smoke.json"
run_step tests 60 tests.log env CCAM_REQUIRE_CUDA_BACKEND="$CUDA_BUILT" \
  "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_cuda.py --junitxml="$WORK/tests.xml"

# 5. The Triton kernels compiled and tuned for the timed shapes, then the benchmark rows:
#    every contestant but FlexAttention over the rows, FlexAttention at one shape.
run_step prewarm 30 prewarm.log "$PYTHON" benchmarks/prewarm.py --frames 96,16 --batch 1,8
bench_minutes() { awk -v s="$1" 'BEGIN { m = (s - 20) / 60; if (m < 0.3) m = 0.3; printf "%.1f", m }'; }
bench() {  # bench NAME CAP ARGS...
  local name=$1 cap=$2 limit
  shift 2
  limit=$(( BUDGET - RESERVE - HOLD - $(elapsed) ))
  (( limit > cap )) && limit=$cap
  run_step "bench-$name" "$cap" "bench-$name.log" "$PYTHON" -m ccam_kernels.bench --device cuda "$@" \
    --max-minutes "$(bench_minutes "$limit")" --out "$WORK/bench-$name"
}
NOT_FLEX=reference,torch,triton,cuda,sdpa-cudnn,sdpa-efficient
HOLD=$(( BUDGET / 28 )); (( HOLD > 15 )) && HOLD=15
bench attention 60 --bench attention --pass fwd,bwd --frames 96,16 --batch 1,8 --backends "$NOT_FLEX"
bench flex 30 --bench attention --pass fwd,bwd --frames 96 --batch 1 --backends flex
HOLD=0

# 6. One results.json, which backend won each row, and the model's prediction next to each
#    measured row of our kernels.
merge_results() {
  PARTS=()
  for part in "$WORK"/bench-attention/results.json "$WORK"/bench-flex/results.json "$WORK"/bench-projector/results.json; do
    [ -f "$part" ] && PARTS+=("$part")
  done
  if [ "${#PARTS[@]}" -gt 0 ] || [ "$DRY" = 1 ]; then
    run_step "$1" 15 "$1.log" bash -c '"$0" benchmarks/suite_table.py merge "$1/results.json" "${@:3}" &&
      "$0" benchmarks/suite_table.py winners "$1/results.json" > "$2/winners.md" &&
      "$0" benchmarks/suite_table.py predicted "$1/results.json" > "$2/predicted.md"' "$PYTHON" "$OUT" "$WORK" "${PARTS[@]}"
  else
    skip_step "$1" "not run: no benchmark run wrote results"
  fi
}
merge_results results

# 7. With time left: the projector rows (merged again), and the Triton tests compiled on the GPU.
HOLD=$(( BUDGET / 28 )); (( HOLD > 15 )) && HOLD=15
bench projector 40 --bench projector --pass fwd,fwd+bwd --frames 96 --batch 1 --backends reference,torch,triton,cuda
HOLD=0
if [ -f "$WORK/bench-projector/results.json" ] || [ "$DRY" = 1 ]; then merge_results results-projector; fi
run_step triton 60 tests-triton.log "$PYTHON" -m pytest -q -p no:cacheprovider -m triton tests \
  --junitxml="$WORK/tests-triton.xml"

if [ "$DRY" = 1 ]; then
  echo "plan ends by ${SIM} s at the latest (deadline ${BUDGET} s)"
  exit 0
fi
say "done in ${SECONDS} s (exit status ${STATUS}); report: $OUT/SUITE.md"
publish
exit "$STATUS"

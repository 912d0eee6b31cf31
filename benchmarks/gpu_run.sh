#!/usr/bin/env bash
# The prepared GPU run: on a machine with one CUDA GPU and no network, install the package, run the CUDA
# tests, `fused-residual verify --quick` and every benchmark, writing all output into one folder.
#
#   OUT=results-dir benchmarks/gpu_run.sh [BUDGET_SECONDS]      (default budget: 470 s)
#
# Environment: COMMIT=<sha> records the commit (the machine's copy of the tree has no git history: pass
# COMMIT=$(git rev-parse HEAD) from the checkout); PHASES="linear,sweep gemm" runs only those benchmark
# phases (names in benchmarks/gpu_run.py; default all); TESTS="-k gemm" narrows the CUDA tests;
# FUSED_RESIDUAL_GEMM_TMA=0|1 forces the TMA configs out of / into the benchmarks' autotuning (default: in
# when the CUDA tests of the TMA configs passed); BUILD_CPP=1 also checks, in the background, that the C++
# CPU kernels build against this torch (off by default: it competes with the timings for the CPU).
#
# Files in $OUT: run.log (everything printed), pytest.log, bench.csv (every benchmark row), plots.tar.gz,
# cpp_build.log (with BUILD_CPP=1). Phases run in priority order, each in its own process, and are skipped
# when the budget would not cover them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
BUDGET=${1:-470}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1

echo "== fused_residual GPU run, $(date -Is), budget ${BUDGET}s"
echo "command: OUT=$OUT benchmarks/gpu_run.sh $*"
echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv || true
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

# Install without the C++ build (the CUDA path needs only Triton); no index: the machine has no network.
if ! FUSED_RESIDUAL_BUILD_CPP=0 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
  echo "pip install -e failed; running from the source tree"
  ln -sfn ../kernels fused_residual/_kernels && ln -sfn ../benchmarks fused_residual/_benchmarks
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m fused_residual.cli info

# With BUILD_CPP=1, meanwhile, check that the C++ CPU kernels build against this torch (in a copy).
[ "${BUILD_CPP:-0}" != 1 ] || (rm -rf /tmp/fr_cpp && cp -r . /tmp/fr_cpp && cd /tmp/fr_cpp && rm -rf build \
  && FUSED_RESIDUAL_BUILD_CPP=1 MAX_JOBS=4 timeout 400 python3 setup.py build_ext --inplace > "$OUT/cpp_build.log" 2>&1 \
  ; echo "build exit status $?" >> "$OUT/cpp_build.log" \
  ; PYTHONPATH=/tmp/fr_cpp python3 -c "import fused_residual._C as C; print('import ok:', C.__doc__)" >> "$OUT/cpp_build.log" 2>&1) &
[ "${BUILD_CPP:-0}" != 1 ] || CPP_PID=$!

# CUDA tests (GEMMs untuned here: the benchmarks and verify below run the autotuned kernels).
TEST_BUDGET=$((BUDGET / 2 < 240 ? BUDGET / 2 : 240))
echo "== pytest -m cuda (limit ${TEST_BUDGET}s)"
# pytest-xdist, where installed, spreads the Triton compilations over the CPU cores.
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
FUSED_RESIDUAL_GEMM_AUTOTUNE=0 timeout "$TEST_BUDGET" python3 -m pytest -m cuda -q -p no:cacheprovider -rA $XDIST \
  ${TESTS:-} > "$OUT/pytest.log" 2>&1
echo "pytest exit status $?"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -n 40
tail -n 3 "$OUT/pytest.log"

# The TMA configs are opt-in until measured on a GPU: the benchmarks put them among the autotuner's
# candidates only if their CUDA tests ran and passed (an illegal access there would poison a benchmark
# process); the sweep times each config by name either way, in its own process.
if [ -z "${FUSED_RESIDUAL_GEMM_TMA:-}" ]; then
  if grep -qE "^PASSED .*test_tma_configs_at_the_edges\[.*cuda" "$OUT/pytest.log" \
      && ! grep -qE "^(FAILED|ERROR) .*tma" "$OUT/pytest.log"; then
    FUSED_RESIDUAL_GEMM_TMA=1
  else
    FUSED_RESIDUAL_GEMM_TMA=0
  fi
fi
echo "FUSED_RESIDUAL_GEMM_TMA=$FUSED_RESIDUAL_GEMM_TMA for the benchmarks"
FUSED_RESIDUAL_GEMM_TMA=$FUSED_RESIDUAL_GEMM_TMA python3 benchmarks/gpu_run.py --out "$OUT" --deadline "$DEADLINE" \
  --phases "${PHASES:-}"

if [ -n "${CPP_PID:-}" ] && kill -0 "$CPP_PID" 2>/dev/null; then echo "C++ build still running; not waiting"; fi
tail -n 3 "$OUT/cpp_build.log" 2>/dev/null
echo "== done in $(( $(date +%s) - START ))s"

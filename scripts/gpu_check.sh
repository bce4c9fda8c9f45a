#!/usr/bin/env bash
# The one prepared GPU run (issue 13, section 4): everything only a GPU can tell, in one command
# under 8 minutes on an H100/H200 (16 cores), for a machine without network.
#
#   scripts/gpu_check.sh             run it; results under benchmarks/results/<gpu>/<date>-<rev>/
#   scripts/gpu_check.sh --dry-run   print the plan and check that every test file and selection
#                                    it names exists (pytest --collect-only); no GPU needed (CI)
#   PYTHON=python3 SKIP="bench" scripts/gpu_check.sh    another interpreter; phases to skip
#
# Phases (each under its own time limit; a failing phase does not stop the others):
#   wheels     .whl/*.whl (scripts/gpu_wheels.sh, run where there is network) installed with
#              pip install --no-index --no-deps --target /tmp/site, put on PYTHONPATH
#   build      fastdiff._C for the local GPU (setup.py: nvidia-smi's arch; ptxas -v table)
#   info       python -m fastdiff info
#   ptxas      scripts/ptxas_report.py: registers/spills/smem per kernel, no FMA in the step math
#   tests      the gpu-marked tests and the op/engine test files, whose tensors are on CUDA when
#              a GPU is visible (CUDA and Triton backends), the AOT/ptxas probes included
#   sanitizer  compute-sanitizer memcheck, racecheck, synccheck on a fixed small subset
#   bench      python -m fastdiff bench --quick: step bandwidth vs copy, GroupNorm+SiLU vs eager
#              and torch.compile, attention vs SDPA, the 20-step loop eager/graph vs diffusers
# Output: <out>/{phases.json, summary.md, build.log, info.txt, ptxas-sm*.txt, tests.log,
# tests.xml, sanitizer-*.txt, bench/ (results.json, summary.md, plots)}; a one-screen summary
# is printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SKIP=${SKIP:-}

OP_TESTS=(tests/test_lincomb.py tests/test_lincomb_clip.py tests/test_lincomb_fma.py
          tests/test_nonfinite.py tests/test_threshold.py tests/test_schedule_kernel.py
          tests/test_group_norm.py tests/test_attention.py)
ENGINE_TESTS=(tests/test_sampler.py tests/test_graph.py tests/test_stochastic.py
              tests/test_diffusers_schedulers.py tests/test_digits.py tests/test_unet.py)
PROBE_TESTS=(tests/test_ptxas.py tests/test_fake_cuda.py)
for f in tests/test_*aot*.py; do [[ -e $f ]] && PROBE_TESTS+=("$f"); done  # Triton AOT guard
# gpu-marked tests elsewhere (collected with -m gpu from these files)
GPU_MARKED=(tests/test_accelerate.py tests/test_stress.py)
read -r -a EXTRA_TESTS <<< "${GPU_CHECK_EXTRA_TESTS:-}"  # more test files (the dry run's own test)
OP_TESTS+=("${EXTRA_TESTS[@]}")
# compute-sanitizer: tool -> "files :: -k expression" (a fixed small subset, checked by --dry-run)
declare -A SANITIZE=(
    [memcheck]="tests/test_lincomb.py tests/test_lincomb_clip.py tests/test_threshold.py tests/test_group_norm.py :: float32 and not compile and not opcheck"
    [racecheck]="tests/test_group_norm.py tests/test_threshold.py :: float16 and not compile and not opcheck"
    [synccheck]="tests/test_group_norm.py tests/test_threshold.py tests/test_attention.py :: float16 and not compile and not opcheck"
)
BENCH_FILTER="lincomb or step or group_norm or attention or loop"
declare -A LIMIT=([wheels]=60 [build]=240 [info]=30 [ptxas]=60 [tests]=240 [sanitizer]=150
                  [bench]=150)

collect() {  # collect FILES... [-k EXPR] [-m MARK]: prints the number of tests selected
    "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider "$@" 2>/dev/null \
        | grep -c "::" || true
}

if [[ $DRY -eq 1 ]]; then
    echo "gpu_check.sh --dry-run: the plan (limits in s: $(for p in "${!LIMIT[@]}"; do printf '%s=%s ' "$p" "${LIMIT[$p]}"; done))"
    status=0
    for f in "${OP_TESTS[@]}" "${ENGINE_TESTS[@]}" "${PROBE_TESTS[@]}" "${GPU_MARKED[@]}" \
             scripts/ptxas_report.py scripts/sanitize.sh setup.py; do
        if [[ ! -e $f ]]; then echo "MISSING: $f"; status=1; fi
    done
    [[ $status -eq 0 ]] || { echo "dry run: FAILED"; exit 1; }
    n=$(collect "${OP_TESTS[@]}" "${ENGINE_TESTS[@]}" "${PROBE_TESTS[@]}")
    g=$(collect "${GPU_MARKED[@]}" "${OP_TESTS[@]}" "${ENGINE_TESTS[@]}" -m gpu)
    echo "tests:     ${OP_TESTS[*]} ${ENGINE_TESTS[*]} ${PROBE_TESTS[*]} -> $n tests"
    echo "           + -m gpu in ${GPU_MARKED[*]} (and the above) -> $g gpu-marked tests"
    [[ $n -gt 0 && $g -gt 0 ]] || { echo "EMPTY test selection"; status=1; }
    for tool in memcheck racecheck synccheck; do
        spec=${SANITIZE[$tool]}
        read -r -a files <<< "${spec%% :: *}"
        k=${spec#* :: }
        m=$(collect "${files[@]}" -k "$k" -m "not cuda_graph")
        echo "sanitizer: $tool on ${files[*]} -k '$k' -> $m tests"
        [[ $m -gt 0 ]] || { echo "EMPTY sanitizer selection for $tool"; status=1; }
    done
    b=$(collect benchmarks -k "$BENCH_FILTER")
    echo "bench:     python -m fastdiff bench --quick --filter '$BENCH_FILTER' -> $b benchmarks"
    [[ $b -gt 0 ]] || { echo "EMPTY benchmark selection"; status=1; }
    echo "wheels:    $(ls .whl/*.whl 2>/dev/null | wc -l) in .whl/ (scripts/gpu_wheels.sh fetches them)"
    echo "dry run: $([[ $status -eq 0 ]] && echo ok || echo FAILED)"
    exit $status
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh: no NVIDIA GPU visible (use --dry-run to check the plan)" >&2
    exit 2
fi
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 \
      | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//')
REV=$(git rev-parse --short HEAD 2>/dev/null || echo norev)$(git diff --quiet 2>/dev/null || echo +dirty)
OUT=${OUT_DIR:-benchmarks/results/${GPU}/$(date -u +%Y%m%d-%H%M%S)-${REV}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
T0=$(date +%s)
PHASES=()

phase() {  # phase NAME LOG CMD...: runs CMD under the phase's limit, records rc and seconds
    local name=$1 log=$2; shift 2
    if [[ " $SKIP " == *" $name "* ]]; then PHASES+=("$name skipped 0"); return; fi
    local start rc
    start=$(date +%s)
    echo "== $name (limit ${LIMIT[$name]} s, log $log)"
    timeout "${LIMIT[$name]}" "$@" > "$log" 2>&1
    rc=$?
    PHASES+=("$name $rc $(( $(date +%s) - start ))")
    echo "   rc=$rc in $(( $(date +%s) - start )) s"
}

install_wheels() {
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if [[ ${#wheels[@]} -eq 0 ]]; then echo "no wheels in .whl/"; return 0; fi
    "$PYTHON" -m pip install --no-index --no-deps --target /tmp/site "${wheels[@]}"
}
phase wheels "$OUT/wheels.log" install_wheels
[[ -d /tmp/site ]] && export PYTHONPATH="$PYTHONPATH:/tmp/site"

phase build "$OUT/build.log" "$PYTHON" setup.py build_ext --inplace
phase info "$OUT/info.txt" "$PYTHON" -m fastdiff info
phase ptxas "$OUT/ptxas.log" "$PYTHON" scripts/ptxas_report.py --out "$OUT/ptxas-sm90.txt"

run_tests() {
    "$PYTHON" -m pytest -q -p no:cacheprovider -rfE --junitxml="$OUT/tests.xml" \
        "${OP_TESTS[@]}" "${ENGINE_TESTS[@]}" "${PROBE_TESTS[@]}" &&
    "$PYTHON" -m pytest -q -p no:cacheprovider -rfE -m gpu --junitxml="$OUT/tests-gpu.xml" \
        "${GPU_MARKED[@]}"
}
phase tests "$OUT/tests.log" run_tests

run_sanitizer() {
    local sanitizer status=0
    sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
    for tool in memcheck racecheck synccheck; do
        local spec=${SANITIZE[$tool]} files k opts=""
        read -r -a files <<< "${spec%% :: *}"
        k=${spec#* :: }
        [[ $tool == racecheck ]] && opts="--racecheck-report all"
        echo "## $tool: ${files[*]} -k '$k'"
        # shellcheck disable=SC2086
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" $opts \
            --target-processes all --error-exitcode 99 --print-limit 50 \
            "$PYTHON" -m pytest -q -p no:cacheprovider -x -m "not cuda_graph" -k "$k" \
            "${files[@]}" > "$OUT/sanitizer-$tool.txt" 2>&1 || status=1
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|[0-9]+ (passed|failed)" "$OUT/sanitizer-$tool.txt" | tail -n 3
    done
    return $status
}
phase sanitizer "$OUT/sanitizer.log" run_sanitizer

phase bench "$OUT/bench.log" "$PYTHON" -m fastdiff bench --quick --no-progress \
    --out "$OUT/bench" --filter "$BENCH_FILTER" --timeout $(( ${LIMIT[bench]} - 10 ))

# -- summary ---------------------------------------------------------------------------------
{
    echo "# gpu_check: $GPU, rev $REV, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - T0 )) s"
    echo
    echo "| phase | rc | s |"
    echo "|---|---|---|"
    for p in "${PHASES[@]}"; do read -r n rc s <<< "$p"; echo "| $n | $rc | $s |"; done
    echo
    echo "tests: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" 2>/dev/null | tr '\n' ' ')"
    echo
    grep -E "^FAILED|^ERROR" "$OUT/tests.log" 2>/dev/null | head -n 15
    echo "ptxas: $(tail -n 1 "$OUT/ptxas.log" 2>/dev/null)"
    grep -E "^FAIL" "$OUT/ptxas.log" 2>/dev/null | head -n 5
    echo "sanitizer:"
    grep -E "^## |SUMMARY|passed|failed" "$OUT/sanitizer.log" 2>/dev/null | head -n 12
    echo
    if [[ -f "$OUT/bench/summary.md" ]]; then head -n 30 "$OUT/bench/summary.md"; fi
} > "$OUT/summary.md"
"$PYTHON" - "$OUT" "${PHASES[@]}" <<'PY'
import json, sys
out, phases = sys.argv[1], sys.argv[2:]
rows = [dict(zip(("phase", "rc", "seconds"), p.split())) for p in phases]
json.dump({"phases": rows}, open(f"{out}/phases.json", "w"), indent=1)
PY
cat "$OUT/summary.md" | head -n 60
echo "gpu_check: everything under $OUT"
failed=0
for p in "${PHASES[@]}"; do read -r n rc s <<< "$p"; [[ $rc != 0 && $rc != skipped ]] && failed=1; done
exit $failed

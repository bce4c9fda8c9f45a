#!/usr/bin/env bash
# Runs the tests of every CUDA kernel on the GPU (native and Triton lincomb with clipping,
# dynamic_threshold, schedule_tables, group_norm, attention; the engine, whole-loop graphs and
# the diffusers drop-ins) under NVIDIA compute-sanitizer:
# memcheck (out-of-bounds and misaligned accesses), racecheck (shared-memory hazards),
# initcheck (reads of uninitialised global memory) and synccheck (illegal __syncthreads use).
# Output: benchmarks/results/<gpu>/sanitizer-<tool>.txt, one file per tool; the script fails if
# a tool reports an error or a test fails under it.
#
#   scripts/sanitize.sh                         all four tools
#   TOOLS="memcheck initcheck" scripts/sanitize.sh
#   PYTEST_ARGS="-k lincomb" scripts/sanitize.sh
#   PYTHON=python3 scripts/sanitize.sh          another interpreter (default .venv/bin/python
#                                               when it exists, else python3)
#
# Whole test files run, not only the gpu-marked tests: on a GPU machine every op test puts its
# tensors on CUDA, so the parametrised backend/dtype/shape/layout tests are the kernel coverage.
# The kernels run slowly under the sanitizer (racecheck: 10-100x): memcheck covers the op tests
# and the engine's; the other tools the op tests only (their kernels are the only ones using
# shared memory and barriers that fastdiff owns). The stress test (1,000 replays) is left out:
# it checks stream/graph behaviour, not memory. A device command limited in time can run one
# tool or one file at a time (TOOLS=..., PYTEST_ARGS=...).
# PyTorch's caching allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that every
# tensor is its own allocation and memcheck sees accesses past a tensor's end. A CUDA-graph
# capture cannot allocate in that mode (every graph test would error or fall back to eager),
# so the graph tests (marker cuda_graph, tests/conftest.py) run in a second invocation of each
# tool with the caching allocator on.
set -uo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [[ ! -x "$SANITIZER" ]]; then
    echo "sanitize.sh: compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/it)" >&2
    exit 2
fi
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "sanitize.sh: no NVIDIA GPU visible" >&2
    exit 2
fi
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 \
      | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//')
OUT=benchmarks/results/${GPU}
mkdir -p "$OUT"

TOOLS=${TOOLS:-"memcheck racecheck initcheck synccheck"}
OP_TESTS=(tests/test_lincomb.py tests/test_lincomb_clip.py tests/test_threshold.py
          tests/test_schedule_kernel.py tests/test_group_norm.py tests/test_attention.py)
ENGINE_TESTS=(tests/test_sampler.py tests/test_graph.py tests/test_diffusers_schedulers.py)
read -r -a EXTRA <<< "${PYTEST_ARGS:-}"

declare -A OPTIONS=(
    [memcheck]=""
    [racecheck]="--racecheck-report all"
    [initcheck]=""
    [synccheck]=""
)

status=0
for tool in $TOOLS; do
    log="$OUT/sanitizer-${tool}.txt"
    TESTS=("${OP_TESTS[@]}")
    if [[ $tool == memcheck ]]; then TESTS+=("${ENGINE_TESTS[@]}"); fi
    echo "== compute-sanitizer --tool ${tool} (log: ${log})"
    start=$(date +%s)
    {
        echo "# compute-sanitizer --tool ${tool} ${OPTIONS[$tool]}"
        echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ)  gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n1)"
        echo "# $("$SANITIZER" --version | tail -n1)"
        echo "# git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+dirty')"
    } > "$log"
    rc=0
    for part in plain graphs; do
        if [[ $part == plain ]]; then
            env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1); marker="not cuda_graph"
        else
            env=(); marker="cuda_graph"
        fi
        echo "## ${part}: ${env[*]:-caching allocator on} -m '${marker}'" >> "$log"
        # shellcheck disable=SC2086
        env "${env[@]}" \
            "$SANITIZER" --tool "$tool" ${OPTIONS[$tool]} --target-processes all \
            --error-exitcode 99 --print-limit 200 \
            "$PYTHON" -m pytest -q -p no:cacheprovider -m "$marker" "${TESTS[@]}" "${EXTRA[@]}" \
            >> "$log" 2>&1
        part_rc=$?
        # 5: no test selected (e.g. no graph test in the op files for this PYTEST_ARGS)
        if [[ $part_rc -ne 0 && $part_rc -ne 5 ]]; then rc=$part_rc; fi
    done
    summary=$(grep -E "ERROR SUMMARY|LEAK SUMMARY|RACECHECK SUMMARY" "$log" | tail -n 3 | tr '\n' ' ')
    tests=$(grep -E "[0-9]+ (passed|failed)" "$log" | tail -n2 | tr "\n" " ")
    echo "   rc=${rc} $(( $(date +%s) - start )) s; ${tests}; ${summary}"
    echo "# exit code ${rc}" >> "$log"
    if [[ $rc -ne 0 ]]; then status=1; fi
done
exit $status

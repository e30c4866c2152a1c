#!/usr/bin/env bash
# The GPU session in one script: run on a lent GPU machine from a tree staged with the wheels
# (fla-core, einops) in whl/, sglang's layernorm_gated.py in sgl/ and the sglang loader script
# (upstream_sglang.py, provided with the project's shared tools) in tools/ (none of those are committed):
# `bash benchmarks/stage_gpu.sh` stages all of it into .gpu/stage.
#
#   bash benchmarks/gpu_suite.sh full      # issue 16's acceptance run in one device call: the whole bench_gpu
#                                          # table (every shape, sglang and fla beside us, the host breakdown),
#                                          # its goals checked (benchmarks/acceptance.py -> acceptance.md), then
#                                          # `gatednorm verify` on cuda in the time left (FULL_SECONDS, 575);
#                                          # FULL_ONLY="8192x128,65536x2048": those shapes only (bench_gpu --only)
#   bash benchmarks/gpu_suite.sh tests     # the whole tests/test_gpu.py (over 290 s in one process on a fresh
#                                          # H100), in TESTS_JOBS (8) processes where pytest-xdist is staged,
#                                          # killed after TESTS_SECONDS (500); TESTS_K="EXPR": only -k EXPR;
#                                          # TESTS_DONE="LOG ...": leave out what earlier runs' logs passed
#   bash benchmarks/gpu_suite.sh tune      # the launch-shape sweeps of every bench_gpu shape, forward then
#                                          # forward and backward (tune_gpu.py; about 65 + 75 s on an H100)
#   bash benchmarks/gpu_suite.sh layers    # host time per call of each layer of the eager path at 8192x128 and
#                                          # 2048x128 (probe_host_layers.py, about 30 s)
#   bash benchmarks/gpu_suite.sh cxxplans  # the plans' C++ entry (GATEDNORM_CXX_PLANS=1): build, plan tests,
#                                          # layers probe at 8192x128, bench_host with the entry off and on
#                                          # (CXX_FLAGS, default "0 1 0 1"; about 4 minutes); CXX_GOALS=1 adds
#                                          # bench_gpu's small shapes and issue 16's host goals
#   bash benchmarks/gpu_suite.sh cxxquant  # the quantized plan's C++ entry (on by default since session 23): the
#                                          # plan and quant GPU tests through it, then bench_host at 8192x128 with
#                                          # the C++ entries off and on, alternating (CXX_FLAGS, default "0 1 0 1")
#   bash benchmarks/gpu_suite.sh ncu       # Nsight Compute on the kernels behind two open misses (probe_ncu.py's
#                                          # cases: 8192x128 quantized vs plain forward, 16384x8192's range rescue
#                                          # in-kernel vs its scan kernel); details as text in $OUT/ncu_details.txt
#   bash benchmarks/gpu_suite.sh kernels   # GPU tests + the fused-kernel benchmark (issue 7)
#   bash benchmarks/gpu_suite.sh verify    # the full `gatednorm verify` on cuda, in worker processes
#   bash benchmarks/gpu_suite.sh report    # native eager on GPU, tensor parallel (2 GPUs)
#   bash benchmarks/gpu_suite.sh quant     # the fused quantized forward (issue 14): its GPU tests (every
#                                          # shipped launch shape against float64 first), the benchmark,
#                                          # then the ablation probe (more than one 10-minute device call:
#                                          # split it, or set QUANT_TESTS_TIMEOUT lower)
#   bash benchmarks/gpu_suite.sh quant-bench  # issue 14's acceptance in one device call (about 8 minutes): the
#                                          # quantized forward's and the plans' GPU tests (rescue, launch shapes), the
#                                          # benchmark (fp8, fp8 with UE8M0 scales, int8) and its goals checked
#                                          # (-> acceptance_quant.md), then its host time at 8192x128
#   bash benchmarks/gpu_suite.sh quant-tune  # the fused quantized forward's launch shapes (issue 14): its GPU
#                                          # tests (the split tiles of GATEDNORM_TRITON_SPLIT_GROUPS=1 against
#                                          # float64 and the padded ones), then tune_gpu.py --quant over every
#                                          # shape with the split tiles on, both program orders (about 10
#                                          # minutes: split with QUANT_TUNE_ONLY=g640,per-token / the rest).
#                                          # GATEDNORM_TRITON_SPLIT_GROUPS=1 bash ... quant: the benchmark split
#   bash benchmarks/gpu_suite.sh cold-and-order  # what session 26 left open, one device call (about 8 minutes):
#                                          # the quantized kernel's program order on 32768x4096 groups of 128
#                                          # (tune_gpu.py --quant, both orders), the small shapes' first call after
#                                          # an L2 flush with the range rescue in the kernel and after it
#                                          # (probe_small_eager.py), then the three-part and generic-path GPU tests
#   bash benchmarks/gpu_suite.sh parts    # the three-part tiles of the forward and backward (issue 16, groups
#                                          # of 96): their GPU tests, the g96 row of bench_gpu.py padded (the
#                                          # default) and in three parts (GATEDNORM_TRITON_SPLIT_GROUPS=1), then
#                                          # the forward's launch-shape sweep for that row with the parts on
#   bash benchmarks/gpu_suite.sh host     # eager plans (issue 16, host time): their GPU tests, then host time
#                                          # per call at 2048, 8192 and 65536 rows of 128 (bench_host.py)
#   bash benchmarks/gpu_suite.sh variants NAME..  # bench_gpu.py over VARIANTS_ONLY's shapes (bench_gpu --only),
#                                          # sglang and fla beside, once with the tree's triton backend and once
#                                          # per variant staged as ab/NAME/triton (STAGE_VARIANTS, stage_gpu.sh),
#                                          # the tree's first and last: a launch constant against the peers, each
#                                          # version in its own run (session 33's tile logs; 25-40 s a version)
#   bash benchmarks/gpu_suite.sh ab BASE.. # GPU tests (AB_TESTS=0: none), then forward A/B against other
#                                          # versions of the triton backend: old triton_kernels.py files or
#                                          # backends/triton folders (see benchmarks/bench_triton_ab.py; staged
#                                          # by STAGE_AB_REVS, see stage_gpu.sh); AB_ARGS="--backward --only X",
#                                          # or AB_ARGS="--quant fp8_e4m3" (the fused quantized forward)
#
# Results go to $OUT (default gpu_out/), with triton_cache.tgz, Triton's compiled kernels of the call: copy it to
# .gpu/triton_cache.tgz and the next stage_gpu.sh takes it along (see below).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the cache is saved from its own folder
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if ls whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:src
else
    export PYTHONPATH=src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# Triton's on-disk cache at one fixed path (its group files name their members by absolute path), seeded from
# earlier device calls and saved into $OUT at the end: the GPU tests and verify compile hundreds of kernel variants
# (minutes of CPU time a fresh machine spends again; sessions 26 and 27 ran out of time in them). stage_gpu.sh puts
# .gpu/triton_cache.tgz, the file a call brought back, into the stage. Only what a cache hit reads is kept: the
# metadata (json), the binaries (cubin) and the compiled launchers (so); where that is over 12 MiB compressed (the
# whole test_gpu.py's kernels with their launchers came to 15.5 MB in session 28), the launchers are left out (a
# C compiler's second each, against the minutes LLVM and ptxas spend on a kernel).
export TRITON_CACHE_DIR=/tmp/triton_cache
mkdir -p "$TRITON_CACHE_DIR"
if [ -f triton_cache.tgz ] && tar -xzf triton_cache.tgz -C "$TRITON_CACHE_DIR"; then
    echo "triton cache: $(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l) compiled kernels restored"
fi
save_triton_cache() {
    local size patterns=(-name '*.json' -o -name '*.cubin' -o -name '*.so')
    while true; do
        (cd "$TRITON_CACHE_DIR" && find . \( "${patterns[@]}" \) -print0 | tar --null -czf "$OUT/triton_cache.tgz" -T -)
        size=$(stat -c %s "$OUT/triton_cache.tgz" 2>/dev/null || echo 0)
        [ "$size" -le $((12 << 20)) ] && return  # a file back from the device may have 16 MiB; leave room beside it
        rm -f "$OUT/triton_cache.tgz"
        if [ ${#patterns[@]} -gt 5 ]; then
            echo "triton cache: $size bytes compressed with the launchers; saving it without them"
            patterns=(-name '*.json' -o -name '*.cubin')
        else
            echo "triton cache: $size bytes compressed, not saved (over 12 MiB)"
            return
        fi
    done
}
trap save_triton_cache EXIT
# XDIST: pytest's arguments for TESTS_JOBS (default $1) worker processes where pytest-xdist is staged, else none;
# then each worker gets the machine's cores divided among them as torch's CPU threads (OMP_NUM_THREADS, unless set),
# as `gatednorm verify --jobs` gives its workers. Each worker otherwise starts one thread a core: 14 workers on 16
# cores ran 224 threads through the tests' float64 checks, which are CPU work on large tensors. The three-part tests
# took 70-105 s each (session 32, 14 workers; session 30 alike), where session 22's one process ran all
# 80 of them in 41 s; with one thread a worker 8-12 s each, the whole file in 56 s (H100, session 33).
set_xdist() {
    XDIST=()
    if python3 -c "import xdist" 2>/dev/null; then
        local jobs=${TESTS_JOBS:-$1}
        XDIST=(-n "$jobs")
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / jobs > 0 ? $(nproc) / jobs : 1 ))}
        # Inductor compiles in the worker itself (its default: a pool of one subprocess a core, up to 32, in each
        # worker that runs a torch.compile test, each subprocess importing torch)
        export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}
        echo "pytest-xdist: $jobs workers, OMP_NUM_THREADS=$OMP_NUM_THREADS," \
             "TORCHINDUCTOR_COMPILE_THREADS=$TORCHINDUCTOR_COMPILE_THREADS"
    fi
}
SGL=()
[ -f sgl/layernorm_gated.py ] && SGL=(--sglang sgl/layernorm_gated.py --sglang-loader tools)

# `gatednorm verify` on cuda, native and triton, in worker processes (every Triton variant JIT-compiles on first
# use, CPU-bound): killed after $1 seconds, stopping by itself after $2 with a partial report
verify_cuda() {
    timeout --preserve-status "$1" python3 -m gatednorm verify --device cuda --backend native --backend triton \
        --jobs "${VERIFY_JOBS:-12}" --no-progress --progress-every 30 --max-seconds "$2" \
        --json "$OUT/verify_cuda.json" --markdown "$OUT/verify_cuda.md" > "$OUT/verify_cuda.log" 2>&1
}

# bench_gpu.py --quant over fp8, fp8 with UE8M0 scales and int8 into $1 (quant_bench.json, .md, .png), then issue
# 14's goals checked against it into $2; the benchmark's last lines and the verdict count printed
quant_bench() {
    mkdir -p "$1"
    timeout "${QUANT_BENCH_SECONDS:-300}" python3 benchmarks/bench_gpu.py --quant --no-compile \
        --quant-formats fp8_e4m3,fp8_e4m3:ue8m0,int8 "${SGL[@]}" --out "$1" > "$1/quant_bench.log" 2>&1
    echo "bench_gpu --quant exit $?"; tail -12 "$1/quant_bench.log"
    python3 benchmarks/acceptance.py --quant "$1/quant_bench.json" --markdown "$2" | tail -1
}

case "${1:-kernels}" in
full)
    start=$(date +%s)
    ONLY=(); [ -n "${FULL_ONLY:-}" ] && ONLY=(--only "$FULL_ONLY")
    # tables written after every shape: a cut run keeps its rows
    timeout "${FULL_BENCH_SECONDS:-420}" python3 benchmarks/bench_gpu.py --host --no-compile --out "$OUT/full" \
        "${ONLY[@]}" "${SGL[@]}" > "$OUT/bench_gpu_full.log" 2>&1
    echo "bench_gpu exit $? after $(( $(date +%s) - start )) s"
    grep -E "^HOST|done in|copy bandwidth" "$OUT/bench_gpu_full.log" | head -40
    # issue 16's goals, each against the figure this run measured (met / MISSED / not measured)
    python3 benchmarks/acceptance.py --bench "$OUT/full/gpu_bench.json" --markdown "$OUT/acceptance.md" | tail -1
    left=$(( ${FULL_SECONDS:-575} - ($(date +%s) - start) ))
    if [ "$left" -gt 60 ]; then
        verify_cuda "$left" $(( left - 30 ))
        echo "verify exit $?"; tail -8 "$OUT/verify_cuda.log"
    fi
    ;;
tests)
    # in TESTS_JOBS worker processes (8) where pytest-xdist is staged: the run is mostly Triton compiling each
    # variant on the CPU (one process took more than 290 s on a fresh H100 in session 24)
    # TESTS_K: a -k expression choosing part of the file (sessions 23-32 ran it in halves, TESTS_K="quant or plan"
    # and TESTS_K="not (quant or plan)": the whole file did not fit one 10-minute call; with one CPU thread a worker
    # it took 56 s with 14 workers on an H100 in session 33)
    # Each test's outcome is logged by name (-v), so a run cut by the limit says which ran; TESTS_DONE="LOG ...":
    # logs of earlier runs (this mode's), whose passed and skipped tests this run deselects (session 29: the
    # second half, "not (quant or plan)", ran 104 of its 143 tests in 430 s and 77 in 310 s on the same warm
    # machine: its time was the tests' own, not compiles: the workers' CPU threads, see set_xdist)
    set_xdist 8
    SELECT=()
    [ -n "${TESTS_K:-}" ] && SELECT=(-k "$TESTS_K")
    for log in ${TESTS_DONE:-}; do
        while read -r node; do SELECT+=(--deselect "$node"); done \
            < <(grep -E " (PASSED|SKIPPED) " "$log" | grep -oE "tests/test_gpu.py::[^ ]+" | sort -u)
    done
    echo "deselected as done in TESTS_DONE: $(printf '%s\n' "${SELECT[@]}" | grep -c '^--deselect$')"
    # each finished test's outcome and seconds in test_times.tsv (tests/conftest.py), the slowest printed
    GATEDNORM_TEST_TIMES="$OUT/test_times.tsv" timeout "${TESTS_SECONDS:-500}" python3 -m pytest -v -rfE \
        -p no:logging -W ignore -o addopts="" "${XDIST[@]}" "${SELECT[@]}" tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
    echo "pytest exit $?"; tail -5 "$OUT/gpu_tests.log"
    [ -f "$OUT/test_times.tsv" ] && sort -t$'\t' -k3 -g -r "$OUT/test_times.tsv" | head -15
    echo "passed: $(grep -c ' PASSED ' "$OUT/gpu_tests.log"), skipped: $(grep -c ' SKIPPED ' "$OUT/gpu_tests.log"),"\
         "failed: $(grep -cE ' (FAILED|ERROR) ' "$OUT/gpu_tests.log")"
    ;;
tune)
    mkdir -p "$OUT/fwd"
    timeout "${TUNE_SECONDS:-250}" python3 benchmarks/tune_gpu.py --fwd-only --jobs 16 --out "$OUT/fwd" \
        > "$OUT/tune_fwd.log" 2>&1
    echo "tune --fwd-only exit $?"; grep -E "^(FWD|WRONG|compiled)" "$OUT/tune_fwd.log"
    timeout "${TUNE_SECONDS:-250}" python3 benchmarks/tune_gpu.py --jobs 16 --out "$OUT" > "$OUT/tune.log" 2>&1
    echo "tune exit $?"; grep -E "^(BWD|WRONG|compiled)" "$OUT/tune.log"
    ;;
cxxplans)
    # the eager forward plans' C++ entry (cxx_plans.cpp): its build, the plans' GPU tests, the layers probe,
    # then bench_host at 8192x128 with the entry off (GATEDNORM_CXX_PLANS=0) and on, alternating
    export GATEDNORM_CXX_PLANS=1  # on for the tests and the probe (the default; set in case the caller turned it off)
    start=$(date +%s)
    python3 -c "from gatednorm.backends.triton import cxx_plans as h; print('cxx_plans:', h.status())"
    echo "cxx_plans build and load: $(( $(date +%s) - start )) s"
    python3 -m pytest -q -p no:logging -W ignore -o addopts="" tests/test_gpu.py \
        -k "plan or cxx_plans or launch_modes or rescue_kernel_matches" > "$OUT/plan_tests.log" 2>&1
    echo "pytest exit $?" | tee -a "$OUT/plan_tests.log"; tail -3 "$OUT/plan_tests.log"
    python3 benchmarks/probe_host_layers.py --shape 8192x128 --json "$OUT/host_layers_8192x128.json" 2>&1 | tail -32
    for flag in ${CXX_FLAGS:-0 1 0 1}; do
        echo "GATEDNORM_CXX_PLANS=$flag"
        GATEDNORM_CXX_PLANS=$flag python3 benchmarks/bench_host.py --device cuda --shape 8192x128 --calls 1000 \
            --repeats 5 --json "$OUT/host_8192x128_cxx$flag.json" 2>&1 | tail -9
    done
    if [ "${CXX_GOALS:-0}" = 1 ]; then  # issue 16's host goals with the C++ entry on (bench_gpu's small shapes)
        timeout 240 python3 benchmarks/bench_gpu.py --no-compile --only "2048x128,8192x128,65536x128" \
            --out "$OUT/small" "${SGL[@]}" > "$OUT/bench_gpu_small.log" 2>&1
        python3 benchmarks/acceptance.py --bench "$OUT/small/gpu_bench.json" --markdown "$OUT/acceptance_small.md" \
            | grep -i host
    fi
    ;;
cxxquant)
    GATEDNORM_CXX_PLANS=1 python3 -m pytest -q -p no:logging -W ignore -o addopts="" tests/test_gpu.py \
        -k "plan or cxx_plans or quant" > "$OUT/cxx_quant_tests.log" 2>&1
    echo "pytest exit $?" | tee -a "$OUT/cxx_quant_tests.log"; tail -3 "$OUT/cxx_quant_tests.log"
    for flag in ${CXX_FLAGS:-0 1 0 1}; do  # 0: every plan in Python
        echo "GATEDNORM_CXX_PLANS=$flag"
        GATEDNORM_CXX_PLANS=$flag python3 benchmarks/bench_host.py --device cuda --shape 8192x128 --calls 1000 \
            --repeats 5 --json "$OUT/host_8192x128_cxx_$flag.json" 2>&1 | grep -E "torch.mul|quant|layer_norm_fwd|launches"
    done
    ;;
ncu)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
    python3 benchmarks/probe_ncu.py 2>&1 | tail -8  # the cases run, and their graph times, before profiling
    for case in $(python3 benchmarks/probe_ncu.py --list | awk '{print $1}'); do
        per_call=1; case "$case" in *-scan) per_call=2;; esac  # the scan case launches rescue_kernel too
        # skip the warm-up calls (compilations, the plan's start: probe_ncu.WARMUP = 3), profile two calls
        timeout "${NCU_SECONDS:-150}" "$NCU" --clock-control none --set full \
            -k regex:'fwd_kernel|fwd_quant_kernel|rescue_kernel' --launch-skip $((3 * per_call)) \
            --launch-count $((2 * per_call)) -f -o "/tmp/ncu_$case" python3 benchmarks/probe_ncu.py "$case" \
            > "/tmp/ncu_$case.log" 2>&1
        echo "ncu $case exit $?"
        { echo "=== $case"; "$NCU" --import "/tmp/ncu_$case.ncu-rep" --page details; } >> "$OUT/ncu_details.txt" 2>&1
    done
    grep -E "^=== |Duration|Achieved Occupancy|Registers Per Thread|Memory Throughput|DRAM Throughput" \
        "$OUT/ncu_details.txt" | head -80
    ;;
layers)
    for shape in 8192x128 2048x128; do
        python3 benchmarks/probe_host_layers.py --shape "$shape" --json "$OUT/host_layers_$shape.json" 2>&1 | tail -30
    done
    ;;
kernels)
    python3 -m pytest -q -p no:logging -W ignore tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
    echo "pytest exit $?" | tee -a "$OUT/gpu_tests.log"; tail -3 "$OUT/gpu_tests.log"
    python3 benchmarks/bench_gpu.py --host --out "$OUT" "${SGL[@]}" 2>&1 | tee "$OUT/bench_gpu.log"
    ;;
verify)
    verify_cuda "${VERIFY_TIMEOUT:-540}" "${VERIFY_SECONDS:-420}"
    echo "verify exit $?"; tail -40 "$OUT/verify_cuda.log"
    ;;
ab)
    if [ "${AB_TESTS:-1}" != 0 ]; then
        python3 -m pytest -q -p no:logging -W ignore tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
        echo "pytest exit $?" | tee -a "$OUT/gpu_tests.log"; tail -3 "$OUT/gpu_tests.log"
    fi
    shift
    BASELINES=()
    for f in "$@"; do BASELINES+=(--baseline "$f"); done
    # AB_ARGS: e.g. "--backward --only 16384" (the backward of the wide groups against a staged revision)
    # shellcheck disable=SC2086
    python3 benchmarks/bench_triton_ab.py "${BASELINES[@]}" ${AB_ARGS:-} 2>&1 | tee "$OUT/bench_triton_ab.log"
    ;;
variants)
    shift
    : "${VARIANTS_ONLY:?VARIANTS_ONLY: the shapes, as bench_gpu.py --only takes them}"
    n=0
    for v in current "$@" current; do
        n=$((n + 1))
        # the tree's src with the variant's triton backend over it: the tree's own where v is current
        tree=/tmp/variant_tree && rm -rf "$tree" && mkdir -p "$tree" && cp -r src "$tree/"
        if [ "$v" != current ]; then
            [ -d "ab/$v/triton" ] || { echo "variant $v: ab/$v/triton not staged (STAGE_VARIANTS)"; exit 1; }
            rm -rf "$tree/src/gatednorm/backends/triton" && cp -r "ab/$v/triton" "$tree/src/gatednorm/backends/"
        fi
        PYTHONPATH=/tmp/site:$tree/src timeout "${VARIANT_SECONDS:-150}" python3 benchmarks/bench_gpu.py --no-compile \
            --only "$VARIANTS_ONLY" "${SGL[@]}" --out "$OUT/$n-$v" > "$OUT/$n-$v.log" 2>&1
        echo "== $n $v: bench_gpu exit $?"
        # the table's rows of those shapes (forward, then forward+backward)
        grep -E '^\| [0-9]+x[0-9]+ ' "$OUT/$n-$v/gpu_bench.md"
    done
    ;;
quant)
    # the shipped launch shapes against float64 first, then test_quant.py's triton tests (about 5 minutes on an
    # H200: a compile per variant; -k "quant" would also select the native ones, by the module's name)
    python3 -m pytest -q -p no:logging -W ignore -o addopts="" tests/test_gpu.py -k "quant" \
        > "$OUT/quant_tests.log" 2>&1
    echo "pytest exit $?" | tee -a "$OUT/quant_tests.log"; tail -3 "$OUT/quant_tests.log"
    timeout "${QUANT_TESTS_TIMEOUT:-330}" python3 -m pytest -q -p no:logging -W ignore -o addopts="" \
        tests/test_quant.py -k "triton or rescue" >> "$OUT/quant_tests.log" 2>&1
    echo "pytest exit $?" | tee -a "$OUT/quant_tests.log"; tail -3 "$OUT/quant_tests.log"
    quant_bench "$OUT" "$OUT/acceptance_quant.md"
    python3 benchmarks/probe_quant_ablation.py --json "$OUT/quant_ablation.json" 2>&1 | tail -30
    ;;
quant-bench)
    # in worker processes where pytest-xdist is staged: in one process the 127 selected tests did not finish in
    # 150 s (session 26, a fresh H100; 12 workers ran 184 tests of this selection and the three-part ones in
    # 420 s, each variant compiling on the CPU)
    set_xdist 12
    timeout "${QUANT_TESTS_TIMEOUT:-270}" python3 -m pytest -q -p no:logging -W ignore -o addopts="" "${XDIST[@]}" \
        tests/test_gpu.py -k "quant or rescue or plan" > "$OUT/quant_tests.log" 2>&1
    gpu_rc=$?
    # test_quant's division checks on the GPU: every float32 amax, every scale significand against IEEE division
    timeout 120 python3 -m pytest -q -p no:logging -W ignore -o addopts="" tests/test_quant.py -k correctly_rounded \
        >> "$OUT/quant_tests.log" 2>&1
    echo "pytest exit $gpu_rc (test_gpu.py), $? (test_quant.py divisions)" | tee -a "$OUT/quant_tests.log"
    tail -3 "$OUT/quant_tests.log"
    quant_bench "$OUT/quant" "$OUT/acceptance_quant.md"
    python3 benchmarks/bench_host.py --device cuda --shape 8192x128 --calls 1000 --repeats 5 \
        --json "$OUT/host_8192x128.json" 2>&1 | tail -9
    ;;
quant-tune)
    python3 -m pytest -q -p no:logging -W ignore -o addopts="" tests/test_gpu.py -k "quant" \
        > "$OUT/quant_tests.log" 2>&1
    echo "pytest exit $?" | tee -a "$OUT/quant_tests.log"; tail -3 "$OUT/quant_tests.log"
    python3 -m pytest -q -p no:logging -W ignore -o addopts="" tests/test_quant.py \
        -k "split_groups or fused_coverage or rescue_kernel_matches" >> "$OUT/quant_tests.log" 2>&1
    echo "pytest exit $?" | tee -a "$OUT/quant_tests.log"; tail -3 "$OUT/quant_tests.log"
    GATEDNORM_TRITON_SPLIT_GROUPS=1 timeout "${QUANT_TUNE_TIMEOUT:-480}" python3 benchmarks/tune_gpu.py --quant --jobs 16 \
        --only "${QUANT_TUNE_ONLY:-}" --out "$OUT" 2>&1 | grep -E "^(QFWD|SUGGEST|WRONG|compiled|NVIDIA|wrote)" \
        | tee "$OUT/tune_quant.log"
    ;;
cold-and-order)
    timeout "${ORDER_TUNE_SECONDS:-240}" python3 benchmarks/tune_gpu.py --quant --jobs 16 --only "32768x4096 g128" \
        --out "$OUT" 2>&1 | grep -E "^(QFWD|SUGGEST|WRONG|compiled|NVIDIA|wrote)" | tee "$OUT/tune_quant_g128.log"
    timeout "${COLD_PROBE_SECONDS:-150}" python3 benchmarks/probe_small_eager.py "${SGL[@]}" \
        --json "$OUT/probe_small_eager.json" > "$OUT/probe_small_eager.log" 2>&1
    echo "probe_small_eager exit $?"; tail -50 "$OUT/probe_small_eager.log"
    set_xdist 12
    timeout "${PARTS_TESTS_SECONDS:-180}" python3 -m pytest -q -p no:logging -W ignore -o addopts="" "${XDIST[@]}" \
        tests/test_gpu.py -k "generic_path or three_part" > "$OUT/cold_and_order_tests.log" 2>&1
    echo "pytest exit $?"; tail -3 "$OUT/cold_and_order_tests.log"
    ;;
parts)
    GATEDNORM_TRITON_SPLIT_GROUPS=1 python3 -m pytest -q -p no:logging -W ignore -o addopts="" tests/test_gpu.py \
        tests/test_triton.py -k "three_part" > "$OUT/parts_tests.log" 2>&1
    echo "pytest exit $?" | tee -a "$OUT/parts_tests.log"; tail -3 "$OUT/parts_tests.log"
    python3 benchmarks/bench_gpu.py --no-compile --only g96 --out "$OUT/padded" "${SGL[@]}" 2>&1 | tail -12
    GATEDNORM_TRITON_SPLIT_GROUPS=1 python3 benchmarks/bench_gpu.py --no-compile --only g96 --out "$OUT/parts" \
        "${SGL[@]}" 2>&1 | tail -12
    GATEDNORM_TRITON_SPLIT_GROUPS=1 timeout "${PARTS_TUNE_TIMEOUT:-300}" python3 benchmarks/tune_gpu.py --fwd-only \
        --only g96 --jobs 16 --out "$OUT/parts" 2>&1 | grep -E "^(FWD|compiled|NVIDIA)" | tee "$OUT/tune_parts.log"
    ;;
host)
    python3 -m pytest -q -p no:logging -W ignore -o addopts="" tests/test_gpu.py -k "plan or launch_modes" \
        > "$OUT/plan_tests.log" 2>&1
    echo "pytest exit $?" | tee -a "$OUT/plan_tests.log"; tail -3 "$OUT/plan_tests.log"
    for rows in 2048 8192 65536; do
        python3 benchmarks/bench_host.py --device cuda --shape "${rows}x128" --calls 1000 --repeats 5 \
            --json "$OUT/host_${rows}x128.json" 2>&1 | tail -12
    done
    ;;
report)
    timeout 150 python3 benchmarks/bench_cpu.py --device cuda --no-memory --reps 9 --reps-bwd 5 \
        --out "$OUT/native_cuda" 2>&1 | tail -30
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
        timeout 200 torchrun --nproc-per-node 2 benchmarks/bench_distributed.py \
            --out "$OUT/bench_distributed.json" 2>&1 | tee "$OUT/bench_distributed.log" | tail -30
    else
        echo "one GPU: tensor-parallel benchmark not run"
    fi
    ;;
esac

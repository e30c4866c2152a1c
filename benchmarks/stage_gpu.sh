#!/usr/bin/env bash
# Stage a tree for a lent GPU machine (no network there): the working tree's src, tests, benchmarks and
# pyproject.toml, plus what benchmarks/gpu_suite.sh expects beside them and the GPU image lacks:
#
#   whl/    fla-core 0.6.0 and einops wheels (fla's kernels beside ours; pip download, or pip's cache offline),
#           and pytest-xdist with execnet (gpu_suite.sh tests: the GPU tests in worker processes)
#   sgl/    sglang 0.5.23's layernorm_gated.py and fp8_kernel.py (its per-token-group quant kernel), from the
#           test environment's sglang (make setup-test)
#   tools/  upstream_sglang.py, the loader of that file (../shared/tools)
#   ab/REV/ with STAGE_AB_REVS="REV ...": each revision's src/gatednorm/backends/triton, for gpu_suite.sh ab
#           (bench_triton_ab.py against it: ab/REV/src/gatednorm/backends/triton)
#   ab/NAME/triton with STAGE_VARIANTS="NAME=SED_EXPR;NAME2=SED_EXPR2": a copy of the working tree's triton backend
#           with the sed expression applied to its launch.py (a launch constant changed), for an A/B against the
#           tree itself: gpu_suite.sh ab NAME=ab/NAME/triton (session 28's ties: STAGE_VARIANTS="v2048x2x8=s/(2048,
#           True): (1, 4,/(2048, True): (2, 8,/"), or against the peers: gpu_suite.sh variants NAME; a variant whose
#           expression changes nothing stops the staging.
#           With a newline in STAGE_VARIANTS each line is one variant, whose expression may chain sed commands
#           with ';' (STAGE_VARIANTS=$'ik32=s/A/B/;s/C/D/\nscan32=s/C/D/'; one such variant alone: $'ik32=s/A/B/;s/C/D/\n')
#   triton_cache.tgz  .gpu/triton_cache.tgz where it exists: Triton's compiled kernels from an earlier device call
#           (gpu_suite.sh saves them into $OUT and restores them first; a miss only compiles again)
#
#   bash benchmarks/stage_gpu.sh [DEST]     # default .gpu/stage (git ignores .gpu/)
#
# Then, with the device tool: carry [".gpu"], command `cd .gpu/stage && bash benchmarks/gpu_suite.sh MODE`
# (MODE: kernels, verify, quant, quant-tune, host, ...; results land in the tool's $OUT).
set -eu
cd "$(dirname "$0")/.."
DEST=${1:-.gpu/stage}
PY=${PYTHON:-.venv/bin/python}
rm -rf "$DEST"
mkdir -p "$DEST/whl" "$DEST/sgl" "$DEST/tools"
cp -r src tests benchmarks pyproject.toml "$DEST/"
rm -rf "$DEST/benchmarks/results"
find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip download --quiet --no-deps --dest "$DEST/whl" "fla-core==0.6.0" einops "pytest-xdist>=3,<4" execnet
SGL=$("$PY" -c "import importlib.util as u; s = u.find_spec('sglang'); print(s.submodule_search_locations[0] if s else '')")
if [ -n "$SGL" ] && [ -f "$SGL/kernels/ops/attention/fla/layernorm_gated.py" ]; then
    cp "$SGL/kernels/ops/attention/fla/layernorm_gated.py" "$DEST/sgl/"
    # its per-token-group quant kernel (benchmarks/upstream_quant.py loads it beside the norm)
    [ -f "$SGL/kernels/ops/quantization/fp8_kernel.py" ] && cp "$SGL/kernels/ops/quantization/fp8_kernel.py" "$DEST/sgl/"
else
    echo "sglang not installed here (make setup-test): sgl/ left empty, bench_gpu.py runs without it" >&2
fi
for rev in ${STAGE_AB_REVS:-}; do
    mkdir -p "$DEST/ab/$rev"
    git archive "$rev" src/gatednorm/backends/triton | tar -x -C "$DEST/ab/$rev"
done
# one variant a line where STAGE_VARIANTS holds a newline (then an expression may chain sed commands with ';'),
# else variants separated by ';'
if [[ "${STAGE_VARIANTS:-}" == *$'\n'* ]]; then
    mapfile -t VARIANTS < <(printf '%s\n' "$STAGE_VARIANTS" | grep -v '^$')
else
    IFS=';' read -ra VARIANTS <<< "${STAGE_VARIANTS:-}"
fi
for variant in "${VARIANTS[@]}"; do
    name=${variant%%=*}
    if [[ "$variant" != *=* || "$name" == */* ]]; then  # e.g. one variant chaining sed commands without a newline
        echo "variant '$variant': not NAME=SED_EXPR (a lone variant chaining commands with ';' needs a newline" \
             "in STAGE_VARIANTS, e.g. \$'NAME=s/A/B/;s/C/D/\\n')" >&2
        exit 1
    fi
    mkdir -p "$DEST/ab/$name"
    cp -r src/gatednorm/backends/triton "$DEST/ab/$name/"
    find "$DEST/ab/$name" -name __pycache__ -prune -exec rm -rf {} +
    sed -i "${variant#*=}" "$DEST/ab/$name/triton/launch.py"
    if cmp -s src/gatednorm/backends/triton/launch.py "$DEST/ab/$name/triton/launch.py"; then
        echo "variant $name: '${variant#*=}' changes nothing in launch.py" >&2
        exit 1
    fi
done
[ -f .gpu/triton_cache.tgz ] && cp .gpu/triton_cache.tgz "$DEST/"
if [ -f ../shared/tools/upstream_sglang.py ]; then
    cp ../shared/tools/upstream_sglang.py "$DEST/tools/"
else
    echo "../shared/tools/upstream_sglang.py not found: tools/ left empty" >&2
fi
du -sh "$DEST"
ls "$DEST/whl" "$DEST/sgl" "$DEST/tools"

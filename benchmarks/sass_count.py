"""Instructions per element of the fused quantized forward's sm_90 code, compiled on a machine without a GPU.

The fused kernel (``fwd_quant_kernel``) has enough arithmetic per element to be bound by instruction issue on an
H200 rather than by memory (UE8M0 scales, one multiply per element where float32 scales take six, ran 10 points
of the copy bandwidth closer to it; docs/design.md, "Quantized output"). Without a GPU the instruction count is
what can be measured: this script compiles the kernel with Triton for sm_90 (``triton.compile`` with a
``GPUTarget``; ``ptxas`` and ``cuobjdump`` ship with Triton), with the specialisation a real launch gets (16-byte
aligned pointers and row strides), disassembles it and counts the SASS instructions of the whole kernel (every
path, the rarely taken rescue and division slow paths included: a static count, an upper bound of what one
program runs), divided by the real elements one thread holds. Rows: each launch shape as shipped
(``launch._quant_config``, marked "default") and others, and for groups of two power-of-two parts
(``launch.split_parts``) the two-tile kernel (the default) against the padded tile
(``GATEDNORM_TRITON_SPLIT_GROUPS=0``) at its own launch shape.

    PYTHONPATH=src python benchmarks/sass_count.py [--out benchmarks/results/quant_sass_sm90.md]

``--parts``: the same count for the plain forward and backward (``fwd_kernel``, ``bwd_kernel``) over groups of
three power-of-two parts (``launch.fwd_parts``: 96 = 3 x 32, ...), three unpadded tiles (the default) against one
tile padded to the next power of two (``GATEDNORM_TRITON_SPLIT_GROUPS=0``), at the shipped launch shape and
others:

    PYTHONPATH=src python benchmarks/sass_count.py --parts [--out benchmarks/results/parts_sass_sm90.md]

A count is not a speed: it says where instruction issue can bind, and the device's timing decides. The code is
that of the Triton installed here; the GPU image runs Triton 3.6, whose code can differ (a 16384-wide backward
spilled 4 values with 3.9 and none with 3.6). To count with 3.6 (PyPI is reachable from the CPU machine)::

    pip download --no-deps triton==3.6.0 -d /tmp/t36whl && pip install --no-deps --target /tmp/t36site /tmp/t36whl/*.whl
    PYTHONPATH=/tmp/t36site:src python benchmarks/sass_count.py ...
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.disasm import get_sass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from gatednorm.backends.triton import kernels, launch  # noqa: E402
from gatednorm.spec import NormSpec, QuantSpec  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
#: (group size, quant block, variant as in bench_quant.SHAPES: "rms gate-after" / "rms gate-before" / "LN+bias
#: no gate", extra launch shapes to count beside the shipped one)
CASES = [
    (128, 128, "rms gate-after", [(32, 4)]),
    (640, 128, "rms gate-before", [(1, 1), (2, 1), (8, 4)]),
    (640, 640, "rms gate-before", [(1, 1)]),
    (384, 128, "rms gate-after", [(8, 8)]),
    (1280, 128, "rms gate-after", [(2, 8)]),
    (5120, 128, "rms gate-before", [(2, 8)]),
    (4096, 128, "rms gate-after", []),
    (64, 4096, "rms gate-after", [(2, 4)]),
    (2048, 2048, "LN+bias no gate", [(1, 4)]),
]
VARIANTS = {"rms gate-after": (True, True, True, False), "rms gate-before": (True, False, True, False),
            "LN+bias no gate": (False, True, False, True)}  # is_rms, norm_before_gate, has_z, has_bias
FORMATS = [("fp8_e4m3", "float32"), ("fp8_e4m3", "ue8m0"), ("int8", "float32")]
_SASS_LINE = re.compile(r"[-0-9a-fA-F:]+:\d+\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def compile_quant(gs: int, block: int, variant: str, quant: str, fmt: str, rows: int, warps: int,
                  glo: int | None = None):
    """fwd_quant_kernel for bf16 x (and z) in one of VARIANTS, as launch.forward_quant would launch it
    (hardware fp8 conversion, no in-kernel rescue); ``glo`` forces GLO (0: the padded tile)."""
    is_rms, norm_before_gate, has_z, has_bias = VARIANTS[variant]
    spec = NormSpec(1e-6, gs, norm_before_gate, is_rms, "swish")
    qspec = QuantSpec(quant, block, fmt, "none", False)
    constexprs = launch._quant_kernel_constexprs(spec, qspec, launch.quant_layout(gs, block), has_z, has_bias,
                                                 False, False)
    constexprs.update(BF16_BY_BITS=False, ROWS=rows, RESCUE_IN_KERNEL=False, GROUPS_FASTEST=False)
    if glo is not None:
        constexprs["GLO"] = glo
    signature = {"X": "*bf16", "Z": "*bf16", "W": "*bf16", "B": "*bf16", "Q": "*i8" if quant == "int8" else "*fp8e4nv",
                 "S": "*fp32", "M": "i32", "stride_xm": "i32", "stride_zm": "i32", "stride_qm": "i32",
                 "stride_sm": "i32", "stride_sg": "i32", "eps": "fp32"}
    return _compile(kernels.fwd_quant_kernel, signature, constexprs,
                    ("X", "Z", "W", "B", "Q", "S", "stride_xm", "stride_zm", "stride_qm"), warps)


def _compile(kernel, signature: dict[str, str], constexprs: dict, aligned: tuple[str, ...], warps: int):
    """``kernel`` compiled for TARGET with these argument types and constexprs, the ``aligned`` arguments
    specialised as 16-byte aligned (what a real launch's pointers and row strides get)."""
    names = kernel.arg_names
    src = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    return triton.compile(src, target=TARGET, options={"num_warps": warps})


#: fwd_kernel's variants: is_rms, norm_before_gate, has_z, has_bias.
FWD_VARIANTS = {"LN+bias gate-before": (False, False, True, True), "rms gate-after": (True, True, True, False),
                "rms gate-before": (True, False, True, False)}
#: (group size, variant, extra launch shapes) for --parts: bench_gpu's 32768x3072 groups of 96 row first.
FWD_CASES = [
    (96, "LN+bias gate-before", [(32, 2), (8, 1)]),
    (96, "rms gate-after", [(32, 2)]),
    (48, "LN+bias gate-before", [(32, 2)]),
    (192, "LN+bias gate-before", [(8, 2)]),
    (384, "rms gate-after", [(4, 2)]),
    (768, "rms gate-before", [(2, 2)]),
    (768, "rms gate-after", [(2, 2)]),
    (3072, "rms gate-after", [(1, 4)]),
]


def compile_forward(gs: int, variant: str, rows: int, warps: int, parts: int, groups_fastest: bool):
    """fwd_kernel for bf16 x (and z, y) in one of FWD_VARIANTS as launch.forward would launch it on a large call
    (no residual, the range rescue after the kernel, no PDL), with PARTS forced."""
    is_rms, norm_before_gate, has_z, has_bias = FWD_VARIANTS[variant]
    block = launch._next_pow2(gs)
    flags = (has_z, has_bias, norm_before_gate, is_rms, False, False)
    values = launch._fwd_kernel_constexprs(gs, block, rows, 1, flags, False, False, groups_fastest, False, False)
    names = kernels.fwd_kernel.arg_names
    constexprs = dict(zip(names[-len(values):], values, strict=True))
    constexprs["PARTS"] = parts
    signature = {"X": "*bf16", "R": "*bf16", "Z": "*bf16", "W": "*bf16", "B": "*bf16", "Y": "*bf16", "RO": "*bf16",
                 "MEAN": "*fp32", "RSTD": "*fp32", "M": "i32", "stride_xm": "i32", "stride_rm": "i32",
                 "stride_zm": "i32", "stride_ym": "i32", "stride_om": "i32", "eps": "fp32"}
    return _compile(kernels.fwd_kernel, signature, constexprs,
                    ("X", "Z", "W", "B", "Y", "stride_xm", "stride_zm", "stride_ym"), warps)


def compile_backward(gs: int, variant: str, rows: int, warps: int, parts: int, groups_fastest: bool):
    """bwd_kernel for bf16 tensors in one of FWD_VARIANTS, every gradient asked for, with PARTS forced."""
    is_rms, norm_before_gate, has_z, has_bias = FWD_VARIANTS[variant]
    constexprs = dict(GS=gs, BLOCK=launch._next_pow2(gs), ROWS=rows, NUM_CHUNKS=1, HAS_Z=has_z, HAS_BIAS=has_bias,
                      NORM_BEFORE_GATE=norm_before_gate, IS_RMS=is_rms, SIGMOID_GATE=False, NEED_DX=True,
                      NEED_DZ=has_z, NEED_DW=True, NEED_DB=has_bias, BF16_BY_BITS=False, USE_PDL=False,
                      GROUPS_FASTEST=groups_fastest, PARTS=parts)
    signature = dict.fromkeys(("DY", "X", "Z", "W", "B", "DX", "DZ"), "*bf16")
    signature.update({"MEAN": "*fp32", "RSTD": "*fp32", "DW_PART": "*fp32", "DB_PART": "*fp32", "M": "i32",
                      "stride_dym": "i32", "stride_xm": "i32", "stride_zm": "i32", "stride_dxm": "i32",
                      "stride_dzm": "i32", "N": "i32"})
    return _compile(kernels.bwd_kernel, signature, constexprs,
                    ("DY", "X", "Z", "W", "B", "DX", "DZ", "DW_PART", "DB_PART", "stride_dym", "stride_xm",
                     "stride_zm", "stride_dxm", "stride_dzm", "N"), warps)


def parts_rows() -> list[str]:
    """The --parts table's rows (printed as they come): the forward's cases, then the backward's for groups of 96."""
    rows_out = []
    cases = [("forward", gs, variant, launch._fwd_config(gs, 2), extra) for gs, variant, extra in FWD_CASES]
    cases += [("backward", 96, variant, launch._bwd_config(96, 2), [(8, 1)]) for variant in FWD_VARIANTS]
    for kernel, gs, variant, config, extra in cases:
        rows0, warps0 = config[2:4]
        groups_fastest = kernel == "forward" and config[4] == launch.ORDER_GROUPS_FASTEST
        compile_fn = compile_forward if kernel == "forward" else compile_backward
        for rows, warps in dict.fromkeys([(rows0, warps0), *extra]):
            for parts in (1, 3):
                total, regs, _ = sass_counts(compile_fn(gs, variant, rows, warps, parts, groups_fastest))
                kind = "three parts" if parts == 3 else "padded"
                if (rows, warps) == (rows0, warps0):
                    kind += " (default)" if parts == launch.fwd_parts(gs) else f" (SPLIT_GROUPS={parts // 3})"
                row = (f"| {kernel} | {gs} | {variant} | ({rows}, {warps}) | {kind} | {total} | {regs} | "
                       f"{total * 32 * warps / (rows * gs):.1f} |")
                rows_out.append(row)
                print(row, flush=True)
    return rows_out


def sass_counts(compiled) -> tuple[int, int, collections.Counter]:
    """(instructions, highest register number used, instructions by opcode) of a compiled kernel."""
    sass = get_sass(compiled.asm["cubin"])
    ops: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            ops[m.group(2).split(".")[0]] += 1
    return sum(ops.values()), max(map(int, re.findall(r"\bR(\d+)", sass)), default=0), ops


def per_element(total: int, gs: int, block: int, rows: int, warps: int) -> float:
    """Instructions per real element a thread holds: a tile is ``rows`` rows of max(group, block) features."""
    return total * 32 * warps / (rows * max(gs, block))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the table as Markdown here")
    ap.add_argument("--parts", action="store_true",
                    help="count fwd_kernel and bwd_kernel over three-part groups instead")
    args = ap.parse_args()
    if args.parts:
        lines = ["# fwd_kernel and bwd_kernel over groups of three parts: sm_90 instructions per element (compiled "
                 "without a GPU)", "",
                 f"Command: `PYTHONPATH=src python benchmarks/sass_count.py --parts`; triton {triton.__version__}. "
                 "Static count of the whole kernel (every path) over the real elements a thread holds; bf16 in; "
                 "the backward with every gradient asked for.", "",
                 "| kernel | group | variant | launch shape (rows, warps) | tile | instructions | registers | "
                 "per element |",
                 "|---|---|---|---|---|---|---|---|", *parts_rows()]
        _write(args.out, lines)
        return
    lines = ["# fwd_quant_kernel: sm_90 instructions per element (compiled without a GPU)", "",
             f"Command: `PYTHONPATH=src python benchmarks/sass_count.py`; triton {triton.__version__}. Static count of "
             "the whole kernel (every path) over the real elements a thread holds; bf16 in.", "",
             "| group / block | variant | format | launch shape (rows, warps) | tile | instructions | registers | "
             "per element |",
             "|---|---|---|---|---|---|---|---|"]
    for gs, block, variant, extra in CASES:
        layout = launch.quant_layout(gs, block)
        tile = layout[0] * layout[1]
        split = launch.split_parts(gs) if layout[0] == 1 else 0
        default_glo = launch.split_low(gs) if layout[0] == 1 else 0  # what a launch reads: split where switched on
        kinds = {glo: "split" if glo else "pow2" if not gs & (gs - 1) else "padded" for glo in {split, 0}}
        # the launch shape of each kind of tile, by GLO (0: one tile), the default's first
        shapes = {glo: launch.quant_launch_shape((tile, kinds[glo]))[:2]
                  for glo in dict.fromkeys([default_glo, split, 0])}
        for quant, fmt in FORMATS:
            for rows, warps in dict.fromkeys([*shapes.values(), *extra]):
                for glo in ([split, 0] if split else [0]):
                    total, regs, _ = sass_counts(compile_quant(gs, block, variant, quant, fmt, rows, warps, glo))
                    kind = "split" if glo else "padded" if gs & (gs - 1) else "one tile"
                    if (rows, warps) == shapes[glo]:
                        kind += " (default)" if glo == default_glo else f" (SPLIT_GROUPS={int(bool(glo))})"
                    row = (f"| {gs} / {block} | {variant} | {quant} {fmt} | ({rows}, {warps}) | {kind} | {total} | "
                           f"{regs} | {per_element(total, gs, block, rows, warps):.1f} |")
                    lines.append(row)
                    print(row, flush=True)
    _write(args.out, lines)


def _write(path: str | None, lines: list[str]) -> None:
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""sglang's per-token-group 8-bit quantization kernel, loaded from its source file without installing sglang.

What a serving stack runs today in place of our fused quantized output: the gated norm writes y in bf16, then
sglang's ``_per_token_group_quant_8bit`` (``sglang/kernels/ops/quantization/fp8_kernel.py``, the kernel behind
``per_token_group_quant_fp8`` for row-major float32 scales) reads y back and writes the fp8 codes and one scale
per group of ``block`` features. Importing that module pulls in most of sglang (its environment, sgl_kernel,
aiter, deep_gemm probes), which the GPU image lacks: this module takes the one ``@triton.jit`` function out of the
file (parsed with ``ast``, written with its two imports to a temporary module so Triton can read its source) and
launches it as sglang's ``_per_token_group_quant_8bit_raw`` does for that layout: one program per group, the
group's width rounded up to a power of two, ``num_warps = min(max(BLOCK // 256, 1), 8)``, one stage, eps 1e-10,
the float8 e4m3fn range. Nothing of sglang is kept in this repository; ``benchmarks/stage_gpu.sh`` stages the file.

    quant = load_sglang_group_quant("sgl/fp8_kernel.py")
    q, scale = quant(y, 128)  # y (M, N) contiguous bf16 -> q (M, N) float8_e4m3fn, scale (M, N // 128) float32
"""

from __future__ import annotations

import ast
import importlib.util
import os
import tempfile
from collections.abc import Callable

import torch
import triton

KERNEL = "_per_token_group_quant_8bit"
#: The kernel's arguments as the launcher passes them (a version of the file that differs is refused).
ARGS = ["y_ptr", "y_q_ptr", "y_s_ptr", "y_stride", "N", "eps", "bit8_min", "bit8_max", "BLOCK"]


def _kernel_from(path: str):
    """The ``@triton.jit`` function KERNEL of sglang's fp8_kernel.py at ``path``, compiled from a temporary module."""
    with open(path) as f:
        source = f.read()
    node = next((n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == KERNEL), None)
    if node is None:
        raise LookupError(f"{path} has no function {KERNEL}")
    text = ast.get_source_segment(source, node, padded=False)
    decorators = "".join(f"@{ast.get_source_segment(source, d)}\n" for d in node.decorator_list)
    folder = tempfile.mkdtemp(prefix="sgl_quant_")
    module_path = os.path.join(folder, "sgl_group_quant.py")
    with open(module_path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n\n\n" + decorators + text + "\n")
    spec = importlib.util.spec_from_file_location("sgl_group_quant", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernel = getattr(module, KERNEL)
    if list(getattr(kernel, "arg_names", [])) != ARGS:
        raise TypeError(f"{KERNEL} in {path} takes {getattr(kernel, 'arg_names', None)}, this launcher passes {ARGS}")
    return kernel


def load_sglang_group_quant(path: str) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    """``quant(y, block) -> (q, scale)``: sglang's per-token-group fp8 (e4m3fn) quantization of contiguous rows y
    (M, N) in groups of ``block`` features, float32 scales (M, N // block) in row-major order."""
    kernel = _kernel_from(path)
    fp8 = torch.float8_e4m3fn
    qmax = torch.finfo(fp8).max

    def quant(y: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not y.is_contiguous() or y.shape[-1] % block:
            raise ValueError(f"y must be contiguous with its last dimension a multiple of {block}")
        q = torch.empty_like(y, dtype=fp8)
        scale = torch.empty(*y.shape[:-1], y.shape[-1] // block, dtype=torch.float32, device=y.device)
        width = triton.next_power_of_2(block)
        kernel[(y.numel() // block,)](y, q, scale, block, block, 1e-10, bit8_min=-qmax, bit8_max=qmax, BLOCK=width,
                                      num_warps=min(max(width // 256, 1), 8), num_stages=1)
        return q, scale

    return quant

"""gatednorm: the gated, grouped LayerNorm / RMSNorm of linear-attention and Mamba2-style models.

``norm(x) * act(z)`` or ``norm(x * act(z))`` per group of features, computed in float32 and rounded
once, on any device PyTorch runs on (native backend) and with fused Triton kernels on GPUs.
The contract: docs/design.md. Importing this package does no work beyond defining it: no patching
(see :func:`patch` and ``gatednorm install-hook``), no ``torch._dynamo``, no Triton.
"""

from ._version import __version__
from .diagnostics import info
from .functional import (
    _layer_norm_fwd_native,
    gated_norm_quant,
    layer_norm_fwd,
    layernorm_fn,
    layernorm_fn_native,
    layernorm_linear_fn,
    rmsnorm_fn,
    rmsnorm_fn_native,
    rmsnorm_linear_fn,
    simple_layernorm_native,
)
from .integrations import patch, patched
from .modules import LayerNorm, LayerNormLinear, RMSNorm, RMSNormLinear
from .ops import resolve_backend, triton_available

__all__ = [
    "LayerNorm",
    "LayerNormLinear",
    "RMSNorm",
    "RMSNormLinear",
    "__version__",
    "_layer_norm_fwd_native",
    "gated_norm_quant",
    "info",
    "layer_norm_fwd",
    "layernorm_fn",
    "layernorm_fn_native",
    "layernorm_linear_fn",
    "patch",
    "patched",
    "resolve_backend",
    "rmsnorm_fn",
    "rmsnorm_fn_native",
    "rmsnorm_linear_fn",
    "simple_layernorm_native",
    "triton_available",
]

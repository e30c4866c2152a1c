"""flash-linear-attention (fla-core): ``layernorm_gated`` and ``fused_norm_gate``.

Covered module paths: ``fla.modules.norm.layernorm_gated`` (fla-core 0.4+) and the older
``fla.modules.layernorm_gated``: the forward and backward primitives (``layer_norm_fwd``/
``layer_norm_bwd``, or ``_layer_norm_fwd``/``_layer_norm_bwd`` in older copies; backward returns
``(dx, dw, db, dz)``), ``LayerNormFn`` (forward and backward), ``layernorm_fn``, ``rmsnorm_fn``, and
the ``forward`` of ``LayerNormGated``/``RMSNormGated`` (``RMSNormGated.norm_before_gate`` defaults
to False in fla: the module's own attribute is used, so that default is kept).

``fla.modules.norm.fused_norm_gate`` (or ``fla.modules.fused_norm_gate``): ``layer_norm_gated``,
``rms_norm_gated`` and ``FusedLayerNormGated``/``FusedRMSNormGated.forward`` (and their Swish
subclasses), ``residual=``/``prenorm=``/``residual_in_fp32=`` included; the norm + gate + linear
variants ``layer_norm_swish_gate_linear``/``rms_norm_swish_gate_linear`` and
``FusedLayerNormGatedLinear``/``FusedRMSNormGatedLinear.forward`` (and their SwishGateLinear
subclasses), with gatednorm's memory-saving backward. Not replaced: the kernel-level primitives
``layer_norm_gated_fwd``/``layer_norm_gated_bwd`` and direct ``LayerNormGatedFunction.apply`` /
``LayerNormGatedLinearFunction.apply`` calls (fla's own functions and modules no longer reach them).
"""

from __future__ import annotations

from . import _wrappers as w
from ._core import Planner

PACKAGE = "fla"
LAYERNORM_GATED = ("fla.modules.norm.layernorm_gated", "fla.modules.layernorm_gated")
FUSED_NORM_GATE = ("fla.modules.norm.fused_norm_gate", "fla.modules.fused_norm_gate")


def plan(p: Planner) -> None:
    b = p.backend
    for path in LAYERNORM_GATED:
        m = p.module(path)
        if m is None:
            continue
        fwd = "layer_norm_fwd" if "layer_norm_fwd" in vars(m) else "_layer_norm_fwd"
        bwd = "layer_norm_bwd" if "layer_norm_bwd" in vars(m) else "_layer_norm_bwd"
        p.function(m, fwd, lambda label, orig: w.fwd_plain(label, b))
        p.function(m, bwd, lambda label, orig: w.bwd(label, b))
        p.autograd_function(m, "LayerNormFn", w.autograd_function)
        p.function(m, "layernorm_fn", lambda label, orig: w.layernorm_fn_plain(label, b))
        p.function(m, "rmsnorm_fn", lambda label, orig: w.rmsnorm_fn_plain(label, b))
        for names, rms in ((("LayerNormGated", "LayerNorm"), False), (("RMSNormGated", "RMSNorm"), True)):
            cls = p.cls(m, *names)
            if cls is not None:
                p.method(cls, "forward", w.module_forward(p.label(cls, "forward"), b, rms))
    p.require_any(LAYERNORM_GATED)

    for path in FUSED_NORM_GATE:
        m = p.module(path)
        if m is None:
            continue
        for fn, rms in (("layer_norm_gated", False), ("rms_norm_gated", True)):
            p.function(m, fn, lambda label, orig, rms=rms: w.fused_function(label, b, rms))
        for name, rms in (("FusedLayerNormGated", False), ("FusedRMSNormGated", True)):
            cls = p.cls(m, name)
            if cls is not None:
                p.method(cls, "forward", w.fused_module_forward(p.label(cls, "forward"), b, rms))
        # norm + gate + linear (older fla copies may lack them: not required)
        for fn, rms in (("layer_norm_swish_gate_linear", False), ("rms_norm_swish_gate_linear", True)):
            p.function(m, fn, lambda label, orig, rms=rms: w.fused_linear_function(label, b, rms), required=False)
        for name, rms in (("FusedLayerNormGatedLinear", False), ("FusedRMSNormGatedLinear", True)):
            cls = p.cls(m, name, required=False)
            if cls is not None:
                p.method(cls, "forward", w.fused_linear_module_forward(p.label(cls, "forward"), b, rms))


def plan_rms_norm_gated_copies(p: Planner, paths: tuple[str, ...]) -> list[type]:
    """sglang's and vLLM's copies of ``fused_norm_gate``: ``rms_norm_gated`` replaced in each of ``paths`` the
    installed release has; returns the distinct ``FusedRMSNormGated`` classes found, for the framework's plan to
    patch its own way (a plain module in sglang, a ``CustomOp`` in vLLM). Optional: a copy that fails to import
    (vLLM's ``ops.kda`` pulls in its KDA kernels) is skipped, the framework's main file still patched."""
    classes: list[type] = []
    for path in paths:
        m = p.module(path, optional=True)
        if m is None:
            continue
        p.function(m, "rms_norm_gated", lambda label, orig: w.fused_function(label, p.backend, True))
        cls = p.cls(m, "FusedRMSNormGated", required=False)
        if cls is not None and cls not in classes:
            classes.append(cls)
    return classes

"""mamba_ssm: ``mamba_ssm.ops.triton.layernorm_gated`` (the Mamba2 gated RMSNorm).

Covered: ``_layer_norm_fwd``, ``_layer_norm_bwd`` (``(dx, dw, db, dz[, out])``), ``LayerNormFn``
(forward and backward), ``layernorm_fn``, ``rmsnorm_fn``, ``LayerNorm.forward``, ``RMSNorm.forward``
(``norm_before_gate`` defaults to True in mamba_ssm's modules; the module's attribute is used).

sglang and vLLM carry copies of this file's forward half (:func:`plan_forward_copy`) and a tensor-parallel module of
the same norm, ``Mixer2RMSNormGated`` (:func:`plan_mixer2_norm`).
"""

from __future__ import annotations

from collections.abc import Callable

from . import _wrappers as w
from ._core import Planner

PACKAGE = "mamba_ssm"
LAYERNORM_GATED = ("mamba_ssm.ops.triton.layernorm_gated",)


def plan(p: Planner) -> None:
    b = p.backend
    m = p.module(LAYERNORM_GATED[0])
    if m is None:
        p.require_any(LAYERNORM_GATED)
        return
    p.function(m, "_layer_norm_fwd", lambda label, orig: w.fwd_plain(label, b))
    p.function(m, "_layer_norm_bwd", lambda label, orig: w.bwd(label, b))
    p.autograd_function(m, "LayerNormFn", w.autograd_function)
    p.function(m, "layernorm_fn", lambda label, orig: w.layernorm_fn_plain(label, b))
    p.function(m, "rmsnorm_fn", lambda label, orig: w.rmsnorm_fn_plain(label, b))
    for name, rms in (("LayerNorm", False), ("RMSNorm", True)):
        cls = p.cls(m, name)
        if cls is not None:
            p.method(cls, "forward", w.module_forward(p.label(cls, "forward"), b, rms))


def plan_forward_copy(p: Planner, path: str) -> None:
    """A framework's copy of this file's forward half, where the installed release has it (sglang's and vLLM's
    ``mamba/ops/layernorm_gated``): ``_layer_norm_fwd`` and ``rms_norm_gated(x, weight, bias, z=None, ...)``.
    Optional: a copy that fails to import is skipped (the framework's main file is still patched)."""
    m = p.module(path, optional=True)
    if m is not None:
        p.function(m, "_layer_norm_fwd", lambda label, orig: w.fwd_plain(label, p.backend))
        p.function(m, "rms_norm_gated", lambda label, orig: w.rms_norm_gated_positional(label, p.backend),
                   required=False)


def plan_mixer2_norm(p: Planner, path: str) -> tuple[type, Callable] | None:
    """sglang's and vLLM's tensor-parallel ``Mixer2RMSNormGated`` (the Mamba2 mixer's norm, in ``path``), where the
    installed release has it: ``forward_native`` replaced (see ``_wrappers.mixer2_forward_native``); returns the
    class and the replacement, for the framework to route instances its dispatch bound before the patch.
    Optional, as :func:`plan_forward_copy`: its file imports much of the framework, and one that fails is skipped."""
    m = p.module(path, optional=True)
    cls = None if m is None else p.cls(m, "Mixer2RMSNormGated", required=False)
    if cls is None:
        return None
    ours = w.mixer2_forward_native(p.label(cls, "forward_native"), p.backend, cls.forward_native)
    p.method(cls, "forward_native", ours)
    return cls, ours

"""vLLM: the fla ``layernorm_guard`` copy and ``RMSNormGated`` in ``vllm.model_executor.layers.layernorm``.

Covered module paths: ``vllm.model_executor.layers.fla.ops.layernorm_guard`` (older releases, e.g.
0.11) and ``vllm.third_party.flash_linear_attention.ops.layernorm_guard`` (newer, e.g. 0.33):
``layer_norm_fwd`` (with ``activation`` where the release has it), ``layernorm_fn``, ``rmsnorm_fn``,
``_layer_norm_fn_impl`` and ``LayerNormFn`` where present, and ``RMSNormGated.forward``
(``norm_before_gate`` defaults to False in vLLM; the module's attribute is used).

``vllm.model_executor.layers.mamba.ops.layernorm_gated`` (mamba_ssm's kernel file, as vLLM carries it for the
Mamba2 mixer of Mamba2 / Falcon-H1 / NemotronH / Bamba / Zamba2 / Granite-4 models): ``_layer_norm_fwd`` and
``rms_norm_gated`` (positional). ``Mixer2RMSNormGated`` (``vllm.model_executor.layers.mamba.mamba_mixer2``, a
``CustomOp``; optional: skipped with a warning where that file fails to import): its ``forward_native`` is
replaced, the torch-op path vLLM takes on CPU, where custom ops are disabled, and from ``forward_cuda`` for every
group count but one. Calls whose groups lie whole on every rank (one rank, or ``tp_size`` dividing ``n_groups``) go
to gatednorm; a group split over ranks (its all_reduce / all_gather) and ``use_rms_norm=False`` keep vLLM's code.
``forward_cuda``'s one-group call reaches the ``rms_norm_gated`` the patch rebinds; a ``forward`` is added as
for ``RMSNormGated`` below (instances bound to the original ``forward_native`` before the patch).

fla's ``fused_norm_gate`` as vLLM carries it (``vllm.third_party.flash_linear_attention.ops.fused_norm_gate``
and its twin in ``...ops.kda``, behind Kimi Linear's and Bailing-MoE v3's ``o_norm``): ``rms_norm_gated``
(``residual=`` / ``prenorm=`` / ``residual_in_fp32=``, the (T, H, D) gate) and ``kda.FusedRMSNormGated`` (a
``CustomOp``, re-exported by fused_norm_gate): ``forward_native`` and ``forward_cuda`` replaced and a ``forward``
added, as for ``RMSNormGated`` below.

``vllm.model_executor.layers.layernorm.RMSNormGated`` (a ``CustomOp``): ``forward_native`` and
``forward_cuda`` are replaced, and a ``forward`` is added to the class (removed again by undo).
vLLM binds the platform's method to each instance when it is built (``_forward_method``); the added
``forward`` sends instances whose bound method is one of vLLM's originals to gatednorm, so modules
built before the patch are covered too. An instance whose method vLLM had wrapped in
``torch.compile`` keeps that compiled original.
"""

from __future__ import annotations

import inspect

from . import _wrappers as w
from . import fla, mamba_ssm
from ._core import Planner

PACKAGE = "vllm"
LAYERNORM_GUARD = (
    "vllm.model_executor.layers.fla.ops.layernorm_guard",
    "vllm.third_party.flash_linear_attention.ops.layernorm_guard",
)
LAYERNORM = "vllm.model_executor.layers.layernorm"
MAMBA_OPS = "vllm.model_executor.layers.mamba.ops.layernorm_gated"
MIXER2 = "vllm.model_executor.layers.mamba.mamba_mixer2"
FUSED_NORM_GATE = (
    "vllm.third_party.flash_linear_attention.ops.fused_norm_gate",
    "vllm.third_party.flash_linear_attention.ops.kda",
)
_PLATFORM_METHODS = ("forward_native", "forward_cuda", "forward_hip", "forward_xpu", "forward_cpu", "forward_oot",
                     "forward_tpu")


def _has_activation(fn) -> bool:
    return fn is not None and "activation" in inspect.signature(fn).parameters


def _custom_op_forward(ours, originals: frozenset):
    """A ``forward`` for a patched ``CustomOp`` class: ours where the instance's bound platform method is one of
    vLLM's originals (or none is bound), else that method (e.g. one vLLM wrapped in torch.compile)."""

    def forward(self, *args, **kwargs):
        bound = self.__dict__.get("_forward_method")
        if bound is None or getattr(bound, "__func__", None) in originals:
            return ours(self, *args, **kwargs)
        return bound(*args, **kwargs)

    return forward


def _patch_custom_op(p: Planner, cls, make) -> None:
    """forward_native and forward_cuda of a ``CustomOp`` class replaced by ``make(label)``'s wrappers, and a
    ``forward`` added that serves instances built before the patch too."""
    originals = frozenset(getattr(cls, n) for n in _PLATFORM_METHODS if hasattr(cls, n))
    ours = make(p.label(cls, "forward_native"))
    p.method(cls, "forward_native", ours)
    p.method(cls, "forward_cuda", make(p.label(cls, "forward_cuda")))
    p.plan.append((cls, "forward", _custom_op_forward(ours, originals)))


def plan(p: Planner) -> None:
    b = p.backend
    for path in LAYERNORM_GUARD:
        m = p.module(path)
        if m is None:
            continue
        ns = vars(m)
        act = _has_activation(ns.get("layer_norm_fwd"))
        p.function(m, "layer_norm_fwd",
                   lambda label, orig, act=act: (w.fwd_activation if act else w.fwd_plain)(label, b))
        p.function(m, "layernorm_fn",
                   lambda label, orig, act=act: (w.layernorm_fn_activation if act else w.layernorm_fn_plain)(label, b))
        p.function(m, "rmsnorm_fn",
                   lambda label, orig, act=act: (w.rmsnorm_fn_activation if act else w.rmsnorm_fn_plain)(label, b))
        p.function(m, "_layer_norm_fn_impl", lambda label, orig: w.layernorm_fn_activation(label, b), required=False)
        p.autograd_function(m, "LayerNormFn", w.autograd_function, required=False)
        cls = p.cls(m, "RMSNormGated")
        if cls is not None:
            p.method(cls, "forward", w.module_forward(p.label(cls, "forward"), b, True))
        cls = p.cls(m, "LayerNormGated", required=False)
        if cls is not None:
            p.method(cls, "forward", w.module_forward(p.label(cls, "forward"), b, False))
    p.require_any(LAYERNORM_GUARD)

    mamba_ssm.plan_forward_copy(p, MAMBA_OPS)
    planned = mamba_ssm.plan_mixer2_norm(p, MIXER2)
    if planned is not None:
        # forward_cuda, forward_xpu and forward_cpu look forward_native up by name at each call; an instance that
        # vLLM bound to the original forward_native itself (custom op disabled) is routed by the added forward
        cls, ours = planned
        p.plan.append((cls, "forward", _custom_op_forward(ours, frozenset({cls.forward_native}))))

    for cls in fla.plan_rms_norm_gated_copies(p, FUSED_NORM_GATE):  # one class: fused_norm_gate re-exports kda's
        _patch_custom_op(p, cls, lambda label: w.fused_module_forward(label, b, True))

    m = p.module(LAYERNORM)
    cls = p.cls(m, "RMSNormGated", required=False) if m is not None else None
    if cls is not None:
        _patch_custom_op(p, cls, lambda label: w.module_forward(label, b, True))

"""sglang: the gated-norm module of the Qwen3-Next / Qwen3.5 / Bailing / Jet-Nemotron / Kimi linear-attention layers.

Covered module paths (whichever the installed release has):

* ``sglang.srt.layers.attention.fla.layernorm_gated`` (older releases, e.g. 0.5.9; the path the
  migration guide names) and ``sglang.kernels.ops.attention.fla.layernorm_gated`` (newer, e.g. 0.5.23):
  ``_layer_norm_fwd`` (``activation``; newer: (T, H, N) gate, ``quant_heads``: the FP8 epilogue, through
  ``gated_norm_quant``), ``rms_norm_gated``
  (keyword-only), ``layernorm_fn``, ``LayerNormFn`` (forward replaced, a backward added), and the
  ``forward`` of ``LayerNorm`` and ``RMSNorm`` (imported by the model files as ``RMSNormGated``).
* ``sglang.srt.layers.attention.mamba.ops.layernorm_gated`` (older releases): ``_layer_norm_fwd``,
  ``rms_norm_gated`` (positional).
* ``fused_norm_gate`` beside either layernorm_gated: ``rms_norm_gated`` and
  ``FusedRMSNormGated.forward``, ``residual=``/``prenorm=``/``residual_in_fp32=`` included, and the
  strided (T, H, D) gate the newest release passes for a (T*H, D) input (read through its strides,
  not copied). Not replaced: the primitive ``layer_norm_gated_fwd``.

* ``sglang.srt.layers.attention.mamba.mixer2_rms_norm_gated`` (the Mamba2 mixer's norm, optional: skipped with a
  warning where it fails to import): ``Mixer2RMSNormGated.forward_native``, the torch-op path sglang takes on CPU,
  under torch.compile and where a group is split over tensor-parallel ranks. Calls whose groups lie whole on
  every rank (one rank, or ``tp_size`` dividing ``n_groups``) go to gatednorm; a group split over ranks (its
  all_reduce / all_gather) and ``use_rms_norm=False`` keep sglang's code. Its ``forward_cuda`` calls the
  ``rms_norm_gated`` the patch rebinds. sglang's ``BaseFusedOp`` resolves an instance's path on its first call and
  keeps the bound method (``_forward_method``); a ``forward`` is added to the class (removed again by undo) that
  sends an instance whose kept method is the original ``forward_native`` (it ran before the patch) to gatednorm,
  and every other call through ``BaseFusedOp.forward`` itself.
"""

from __future__ import annotations

import inspect

from . import _wrappers as w
from . import fla, mamba_ssm
from ._core import Planner

PACKAGE = "sglang"
LAYERNORM_GATED = (
    "sglang.srt.layers.attention.fla.layernorm_gated",
    "sglang.kernels.ops.attention.fla.layernorm_gated",
)
MAMBA_OPS = "sglang.srt.layers.attention.mamba.ops.layernorm_gated"
FUSED_NORM_GATE = (
    "sglang.srt.layers.attention.fla.fused_norm_gate",
    "sglang.kernels.ops.attention.fla.fused_norm_gate",
)
MIXER2 = "sglang.srt.layers.attention.mamba.mixer2_rms_norm_gated"


def plan(p: Planner) -> None:
    b = p.backend
    for path in LAYERNORM_GATED:
        m = p.module(path)
        if m is None:
            continue
        fwd = vars(m).get("_layer_norm_fwd")
        if fwd is not None and "quant_heads" in inspect.signature(fwd).parameters:
            p.function(m, "_layer_norm_fwd", lambda label, orig: w.fwd_quant(label, b))
        else:
            p.function(m, "_layer_norm_fwd", lambda label, orig: w.fwd_activation(label, b))
        p.function(m, "rms_norm_gated", lambda label, orig: w.rms_norm_gated_keywords(label, b))
        p.function(m, "layernorm_fn", lambda label, orig: w.layernorm_fn_activation(label, b))
        p.autograd_function(m, "LayerNormFn", w.autograd_function)
        for name, rms in (("LayerNorm", False), ("RMSNorm", True)):
            cls = p.cls(m, name)
            if cls is not None:
                p.method(cls, "forward", w.module_forward(p.label(cls, "forward"), b, rms))
    p.require_any(LAYERNORM_GATED)

    mamba_ssm.plan_forward_copy(p, MAMBA_OPS)

    for cls in fla.plan_rms_norm_gated_copies(p, FUSED_NORM_GATE):
        p.method(cls, "forward", w.fused_module_forward(p.label(cls, "forward"), b, True))

    planned = mamba_ssm.plan_mixer2_norm(p, MIXER2)
    if planned is not None:
        cls, ours = planned
        p.plan.append((cls, "forward", _routing_kept_forward(cls.forward, ours, cls.forward_native)))


def _routing_kept_forward(upstream_forward, ours, original_native):
    """A ``forward`` for a patched ``BaseFusedOp`` class: ours where the instance's dispatch kept the original
    ``forward_native`` from a call before the patch and the call names no ``backend``, else the class's own
    ``forward`` (``BaseFusedOp.forward``: its per-call and global backend switches, its lazy first-call resolution,
    which finds the patched methods)."""

    def forward(self, *args, **kwargs):
        kept = self.__dict__.get("_forward_method")
        if kwargs.get("backend") is None and getattr(kept, "__func__", None) is original_native:
            return ours(self, *args, **kwargs)
        return upstream_forward(self, *args, **kwargs)

    return forward

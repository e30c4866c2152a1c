"""Hugging Face transformers: the torch-native gated RMSNorms of the linear-attention / Mamba2 model files.

The classes are patched in place (their ``forward``), so instances built before the patch are
covered and ``state_dict`` keys stay the same. Three families, each kept to what its own forward
computes, but with one rounding at the end instead of two or three in between:

* norm, then gate: ``y = rmsnorm(x) * w * act(gate)`` over the whole last dim, ``act`` from the
  module's ``activation`` ("silu" or "sigmoid"), returned in x's dtype. Qwen3-Next, Qwen3.5,
  Qwen3.5-MoE, OLMo-hybrid, Qwen4-Exp, Kimi-Linear, Bailing-hybrid, GLM-5-Next, Lara-mini.
  Upstream rounds the normalised x to x's dtype before the weight (Qwen3-Next family), so in
  bf16/fp16 the results differ from upstream by that rounding (ours is closer to float64).
* gate, then norm (Mamba2-style): ``y = rmsnorm(x * silu(gate)) * w`` per group of ``group_size``
  features; older releases of ``MambaRMSNormGated`` have no ``group_size`` (they ignore ``n_groups``
  and normalise over the whole last dim), and that is kept: the module's ``group_size`` attribute is
  used when it exists, else one group. The result dtype is upstream's,
  ``torch.promote_types(weight.dtype, x.dtype)`` (upstream multiplies the fp32 weight into the
  x-dtype result). Mamba2, Bamba, Nemotron-H, GraniteMoE-hybrid, Zamba2.
* Falcon-H1: ``n_groups`` groups and a ``norm_before_gate`` flag, returned in x's dtype.

Calls without a gate where upstream needs one, or with an activation gatednorm does not have, go
to the original forward. ``AXK2GatedRMSNorm`` is a different operator (its gate is computed from
the normalised output) and is not patched.
"""

from __future__ import annotations

import torch

from ..functional import layernorm_fn
from ..spec import ACTIVATIONS
from ._core import Planner
from .counters import hit

PACKAGE = "transformers"

_NORM_THEN_GATE = (
    ("qwen3_next", "Qwen3NextRMSNormGated"),
    ("qwen3_5", "Qwen3_5RMSNormGated"),
    ("qwen3_5_moe", "Qwen3_5MoeRMSNormGated"),
    ("olmo_hybrid", "OlmoHybridRMSNormGated"),
    ("qwen4_exp", "Qwen4ExpTextRMSNormGated"),
    ("kimi_linear", "KimiLinearRMSNormGated"),
    ("bailing_hybrid", "BailingHybridRMSNormGated"),
    ("glm5_next", "Glm5NextTextRMSNormGated"),
    ("lara_mini", "LaraMiniRMSNormGated"),
)
_GATE_THEN_NORM = (
    ("mamba2", "MambaRMSNormGated"),
    ("bamba", "BambaRMSNormGated"),
    ("nemotron_h", "NemotronHRMSNormGated"),
    ("granitemoehybrid", "GraniteMoeHybridRMSNormGated"),
    ("zamba2", "Zamba2RMSNormGated"),
)
_FALCON_H1 = (("falcon_h1", "FalconH1RMSNormGated"),)
# The two classes patching is first meant for (Qwen3-Next, Mamba2): missing from an existing model file,
# they are a layout error; the other classes are patched where present.
_REQUIRED = {"Qwen3NextRMSNormGated", "MambaRMSNormGated"}


def _module_path(model: str) -> str:
    return f"transformers.models.{model}.modeling_{model}"


def _norm_then_gate(label: str, backend: str | None, original):
    def forward(self, hidden_states, gate=None):
        activation = getattr(self, "activation", "silu")
        if gate is None or activation not in ACTIVATIONS:
            return original(self, hidden_states, gate)
        name = hit(label, backend, hidden_states.device)
        return layernorm_fn(hidden_states, self.weight, None, gate, self.variance_epsilon, None, True, True,
                            activation=activation, backend=name)

    return forward


def _gate_then_norm(label: str, backend: str | None, original):
    def forward(self, hidden_states, gate=None):
        name = hit(label, backend, hidden_states.device)
        out_dtype = torch.promote_types(self.weight.dtype, hidden_states.dtype)
        if out_dtype != hidden_states.dtype:  # exact upcast, so the one rounding lands on upstream's dtype
            hidden_states = hidden_states.to(out_dtype)
            gate = gate.to(out_dtype) if gate is not None else None
        return layernorm_fn(hidden_states, self.weight, None, gate, self.variance_epsilon,
                            getattr(self, "group_size", None), False, True, backend=name)

    return forward


def _falcon_h1(label: str, backend: str | None, original):
    def forward(self, hidden_states, gate=None):
        name = hit(label, backend, hidden_states.device)
        n = hidden_states.shape[-1]
        return layernorm_fn(hidden_states, self.weight, None, gate, self.variance_epsilon, n // self.n_groups,
                            bool(self.norm_before_gate), True, backend=name)

    return forward


def plan(p: Planner) -> None:
    found = []
    for table, make in ((_NORM_THEN_GATE, _norm_then_gate), (_GATE_THEN_NORM, _gate_then_norm),
                        (_FALCON_H1, _falcon_h1)):
        for model, class_name in table:
            m = p.module(_module_path(model))
            if m is None:
                continue
            cls = p.cls(m, class_name, required=class_name in _REQUIRED)
            if cls is None:
                continue
            found.append(class_name)
            new = make(p.label(cls, "forward"), p.backend, cls.forward)
            p.method(cls, "forward", new, names_only=True)
    if not found:
        p.problems.append("no gated RMSNorm class found (looked for "
                          + ", ".join(c for t in (_NORM_THEN_GATE, _GATE_THEN_NORM, _FALCON_H1) for _, c in t) + ")")

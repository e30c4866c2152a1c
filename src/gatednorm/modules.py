"""``LayerNorm`` and ``RMSNorm`` modules: gated, grouped, with upstream-compatible state_dict keys.

Parameter names (``weight``, and ``bias`` for LayerNorm; ``bias`` registered as
None for RMSNorm) match mamba_ssm's / sglang's ``LayerNorm``/``RMSNorm`` and
flash-linear-attention's ``LayerNormGated``/``RMSNormGated``, so their
checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import layernorm_fn, layernorm_linear_fn
from .ops import requested_backend
from .spec import canonical_activation, prepare


def check_module_arguments(
    hidden_size: int, eps: float, group_size: int | None, norm_before_gate: bool, is_rms_norm: bool,
    activation: str, backend: str | None,
) -> None:
    """Reject at construction what every forward would reject: ``TypeError``/``ValueError`` naming the argument.

    The checks are the operator's own (:func:`gatednorm.spec.prepare`, run here on shape-only ``meta``
    tensors of ``hidden_size`` features), so a module and a call can never disagree about what is valid.
    ``backend`` must be a known name (whether it can run depends on the device of the call).
    """
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int):
        raise TypeError(f"hidden_size must be an int, got {type(hidden_size).__name__}")
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size}")
    rows = torch.empty(0, hidden_size, device="meta")
    weight = torch.empty(hidden_size, device="meta")
    prepare(rows, weight, None, None, eps, group_size, norm_before_gate, is_rms_norm, activation)
    if backend is not None:
        requested_backend(backend)


class AffineGatedNormBase(nn.Module):
    """What every gated-norm module shares: ``weight`` (and ``bias``, None for RMSNorm) of ``size``
    features initialised to ones/zeros, and the repr of the optional keyword settings.
    Also the base of the tensor-parallel modules in :mod:`gatednorm.distributed`."""

    is_rms_norm: bool = False
    activation: str
    backend: str | None

    def _init_affine(self, size: int, device, dtype) -> None:
        self.weight = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        if self.is_rms_norm:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _options_repr(self) -> str:
        text = f", activation={self.activation!r}" if self.activation != "swish" else ""
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text


class _GatedNorm(AffineGatedNormBase):

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        activation: str = "swish",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_module_arguments(hidden_size, eps, group_size, norm_before_gate, self.is_rms_norm, activation, backend)
        self.hidden_size = hidden_size
        self.eps = float(eps)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.activation = canonical_activation(activation)
        self.backend = backend
        self._init_affine(hidden_size, device, dtype)

    def forward(
        self, x: torch.Tensor, z: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        prenorm: bool = False, residual_in_fp32: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: (..., hidden_size); z: None or x's shape. Returns x's shape and dtype.

        ``residual``/``prenorm``/``residual_in_fp32``: as flash-linear-attention's fused_norm_gate
        modules (the same positional order): the norm of ``x + residual``, and with ``prenorm`` also
        the updated residual, ``(y, residual_out)`` (:func:`gatednorm.layernorm_fn`).
        """
        return layernorm_fn(
            x, self.weight, self.bias, z, self.eps, self.group_size, self.norm_before_gate, self.is_rms_norm,
            activation=self.activation, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}" + self._options_repr())


class LayerNorm(_GatedNorm):
    """Gated, grouped LayerNorm: ``norm(x) * act(z)`` or ``norm(x * act(z))`` per group of features.

    Args:
        hidden_size: N, the size of the last dimension.
        eps: added to the variance (default 1e-5, as upstream modules).
        group_size: features per group (a divisor of N); None means one group of N.
        norm_before_gate: True gates the normalised output, False gates the input.
        activation: "swish" (default) or "sigmoid", keyword only.
        backend: None/"auto"/"native"/"triton"/"compiled", keyword only (None: the process default,
            docs/design.md "Choosing a backend").
    Invalid arguments raise ``TypeError``/``ValueError`` here, at construction, naming the argument.
    Parameters: ``weight`` (N,) initialised to 1, ``bias`` (N,) initialised to 0.
    """


class RMSNorm(_GatedNorm):
    """Gated, grouped RMSNorm; as :class:`LayerNorm` without mean subtraction and with ``bias`` = None.

    ``norm_before_gate`` defaults to True as in mamba_ssm and sglang (flash-linear-attention's and
    vLLM's ``RMSNormGated`` default to False: pass it explicitly when porting from them).
    """

    is_rms_norm = True


class _GatedNormLinear(_GatedNorm):

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, z: torch.Tensor | None, linear_weight: torch.Tensor,
        linear_bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, prenorm: bool = False,
        residual_in_fp32: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``F.linear(norm(x [+ residual]) [gated by z], linear_weight, linear_bias)``: x (..., hidden_size),
        z None, x's shape or (T, H, N) for a (T*H, N) x (a strided slice of a packed projection is read
        without a copy), linear_weight (O, hidden_size), linear_bias (O,) or None; returns (..., O), or
        ``(out, residual_out)`` with ``prenorm``. The positional order is flash-linear-attention's
        ``Fused*GatedLinear.forward(x, g, weight, bias, residual, prenorm, residual_in_fp32)``. The gated
        activation is recomputed in the backward, not stored (:func:`gatednorm.layernorm_linear_fn`).
        """
        return layernorm_linear_fn(
            x, self.weight, self.bias, z, linear_weight, linear_bias, self.eps, self.group_size,
            self.norm_before_gate, self.is_rms_norm, activation=self.activation, residual=residual,
            prenorm=prenorm, residual_in_fp32=residual_in_fp32, backend=self.backend,
        )


class LayerNormLinear(_GatedNormLinear):
    """:class:`LayerNorm` followed by a linear layer whose weight (and bias) the caller passes to ``forward``
    (as in flash-linear-attention's ``FusedLayerNormGatedLinear``, where the output projection owns them).

    The normalised, gated activation is not kept for the backward: it is recomputed there, which saves
    one (M, hidden_size) activation per layer during training. Same constructor arguments and
    parameters as :class:`LayerNorm`.
    """


class RMSNormLinear(_GatedNormLinear):
    """:class:`RMSNorm` followed by a linear layer; see :class:`LayerNormLinear`."""

    is_rms_norm = True

"""Replacement callables with the upstream signatures, shared by the integration targets.

Each builder returns a function whose parameters (names, kinds, defaults) are those of
one upstream entry point; the targets compare them with the installed upstream's
signature before patching (see ``_core.signature_mismatch``), so a drifted upstream is
reported instead of silently mis-called. Every replacement counts its calls with
``counters.hit`` (``label@backend``), which is how tests and users see that a patch took effect.

The computation goes through gatednorm's public functional API, or, where upstream's
primitives hand over 2-D rows and saved statistics, through ``ops.gated_norm_rows`` /
``ops.gated_norm_rows_backward``: never through a backend module directly.

The operator is the one of docs/design.md section 1 (fp32 math, one rounding); upstream's
``group_size=None`` means one group of N, and statistics keep upstream's group-major layout.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..functional import gated_norm_quant, layer_norm_fwd, layernorm_fn, layernorm_linear_fn
from ..ops import gated_norm_rows, gated_norm_rows_backward
from ..spec import compute_dtype, prepare
from .counters import hit

# --- forward primitives: (out, mean | None, rstd), non-differentiable like the Triton launch they replace ---


def _fwd(label, backend, x, weight, bias, eps, z, out, group_size, norm_before_gate, is_rms_norm, activation):
    name = hit(label, backend, x.device)
    with torch.no_grad():
        return layer_norm_fwd(x, weight, bias, eps, z, out, group_size, bool(norm_before_gate), bool(is_rms_norm),
                              activation=activation, backend=name)


def fwd_plain(label: str, backend: str | None) -> Callable:
    """mamba_ssm / fla / older vLLM ``_layer_norm_fwd``/``layer_norm_fwd`` (no activation argument)."""

    def _layer_norm_fwd(x, weight, bias, eps, z=None, out=None, group_size=None, norm_before_gate=True,
                        is_rms_norm=False):
        return _fwd(label, backend, x, weight, bias, eps, z, out, group_size, norm_before_gate, is_rms_norm, "swish")

    return _layer_norm_fwd


def fwd_activation(label: str, backend: str | None) -> Callable:
    """Older sglang / newer vLLM forward with the ``activation`` argument ("swish"/"silu"/"sigmoid")."""

    def _layer_norm_fwd(x, weight, bias, eps, z=None, out=None, group_size=None, norm_before_gate=True,
                        is_rms_norm=False, activation: str = "swish"):
        return _fwd(label, backend, x, weight, bias, eps, z, out, group_size, norm_before_gate, is_rms_norm,
                    activation)

    return _layer_norm_fwd


def fwd_quant(label: str, backend: str | None) -> Callable:
    """Newest sglang forward: ``activation``, a (T, H, N) gate, and ``quant_heads`` (FP8 epilogue).

    ``quant_heads = H`` (Qwen3.5's gated delta net in front of an FP8 ``out_proj``): the H head rows of each
    token, one group of N each, are normalised and quantized together to float8 e4m3fn with one float32 scale
    per token, y rounded to ``out``'s (else x's) dtype first, as sglang's epilogue does. That is
    ``gated_norm_quant`` on the (M / H, H N) view of the rows with the weight repeated per head
    (:func:`_quant_heads`); it returns ``((q (M / H, H N), scale (M / H, 1)), None, None)``.
    """

    def _layer_norm_fwd(x, weight, bias, eps, z=None, out=None, group_size=None, norm_before_gate=True,
                        is_rms_norm=False, activation: str = "swish", quant_heads: int = 0):
        if quant_heads:
            return _quant_heads(label, backend, x, weight, bias, eps, z, out, group_size, norm_before_gate,
                                is_rms_norm, activation, quant_heads)
        return _fwd(label, backend, x, weight, bias, eps, z, out, group_size, norm_before_gate, is_rms_norm,
                    activation)

    return _layer_norm_fwd


def _quant_heads(label, backend, x, weight, bias, eps, z, out, group_size, norm_before_gate, is_rms_norm,
                 activation, heads):
    """sglang's ``_layer_norm_fwd(quant_heads=heads)`` through :func:`gatednorm.gated_norm_quant`.

    Where the results differ from sglang's kernel, by design: the quotient y / scale is the correctly rounded
    one (sglang multiplies by a rounded reciprocal: a code may differ by one step where y / scale lies next to
    a rounding midpoint); a token whose largest |y| is under 1e-10 gets the scale max(amax / 448, 2^-126)
    rather than sglang's 1e-10 / 448 (the same dequantized values, to float8 precision); and mean and rstd are
    None, not the statistics: the fused kernel does not write them, and sglang's one caller (Qwen3.5's gated
    delta net) discards them."""
    if x.dim() != 2:
        raise ValueError(f"quant_heads: x must be 2-D (M, N), got shape {tuple(x.shape)}")
    m, n = x.shape
    if group_size not in (None, n):
        raise ValueError(f"quant_heads: group_size must be None or N = {n} (one group per head), got {group_size}")
    if not isinstance(heads, int) or heads < 1 or m % heads:
        raise ValueError(f"quant_heads must be a positive divisor of the {m} rows, got {heads!r}")
    name = hit(label, backend, x.device)
    tokens = m // heads
    y_dtype = x.dtype if out is None else out.dtype
    with torch.no_grad():
        q, scale = gated_norm_quant(
            x.reshape(tokens, heads * n), _per_head(weight, heads), _per_head(bias, heads), eps,
            None if z is None else z.reshape(m, n).reshape(tokens, heads * n), n, bool(norm_before_gate),
            bool(is_rms_norm), activation=activation, quant="fp8_e4m3",
            round_to=y_dtype if y_dtype in (torch.bfloat16, torch.float16) else None, backend=name)
    return (q, scale), None, None


def _per_head(p: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """``p`` (N,) repeated ``heads`` times: the parameter of H groups of N. A copy per call (H N values): a cache
    could not see weights that serving frameworks overwrite in place through ``.data`` (weight updates), which
    leaves the version counter alone."""
    return p if p is None or heads == 1 else p.detach().repeat(heads)


# --- backward primitive: mamba_ssm `_layer_norm_bwd` / fla `layer_norm_bwd` ---


def bwd(label: str, backend: str | None) -> Callable:
    """Returns ``(dx, dw, db, dz)`` (plus ``out`` when ``recompute_output``), upstream's order and dtypes.

    dx/dz in x's/z's dtype, dw/db in weight's/bias's dtype; ``dz=`` and ``out=`` are written in place.
    ``mean``/``rstd`` are the group-major statistics of the forward (upstream's or ours).
    """

    def _layer_norm_bwd(dy, x, weight, bias, eps, mean, rstd, z=None, group_size=None, norm_before_gate=True,
                        is_rms_norm=False, recompute_output=False, dz=None, out=None):
        name = hit(label, backend, x.device)
        call = prepare(x, weight, bias, z, eps, group_size, bool(norm_before_gate), bool(is_rms_norm), "swish")
        s = call.spec
        c = compute_dtype(x.dtype)
        mean_c = None if (s.is_rms_norm or mean is None) else mean.to(c)
        with torch.no_grad():
            gx, gz, gw, gb = gated_norm_rows_backward(
                dy.reshape(call.x2d.shape), call.x2d, weight, bias, call.z2d, mean_c, rstd.to(c), s, backend=name,
                needs_dz=z is not None, needs_dbias=bias is not None,
            )
            gx = gx.view(x.shape)
            if z is None:
                gz = None
            elif dz is not None:
                dz.copy_(gz.view(dz.shape))
                gz = dz
            else:
                gz = gz.view(z.shape)
            gb = gb if bias is not None else None
            if not recompute_output:
                return gx, gw, gb, gz
            y, _, _ = layer_norm_fwd(x, weight, bias, eps, z, out, group_size, s.norm_before_gate, s.is_rms_norm,
                                     backend=name)
            return gx, gw, gb, gz, y

    return _layer_norm_bwd


# --- differentiable functions ---


def layernorm_fn_plain(label: str, backend: str | None) -> Callable:
    def layernorm_fn_(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, is_rms_norm=False):
        name = hit(label, backend, x.device)
        return layernorm_fn(x, weight, bias, z, eps, group_size, bool(norm_before_gate), bool(is_rms_norm),
                            backend=name)

    return layernorm_fn_


def layernorm_fn_activation(label: str, backend: str | None) -> Callable:
    def layernorm_fn_(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, is_rms_norm=False,
                      activation: str = "swish"):
        name = hit(label, backend, x.device)
        return layernorm_fn(x, weight, bias, z, eps, group_size, bool(norm_before_gate), bool(is_rms_norm),
                            activation=activation, backend=name)

    return layernorm_fn_


def rmsnorm_fn_plain(label: str, backend: str | None) -> Callable:
    def rmsnorm_fn_(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        name = hit(label, backend, x.device)
        return layernorm_fn(x, weight, bias, z, eps, group_size, bool(norm_before_gate), True, backend=name)

    return rmsnorm_fn_


def rmsnorm_fn_activation(label: str, backend: str | None) -> Callable:
    def rmsnorm_fn_(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True,
                    activation: str = "swish"):
        name = hit(label, backend, x.device)
        return layernorm_fn(x, weight, bias, z, eps, group_size, bool(norm_before_gate), True,
                            activation=activation, backend=name)

    return rmsnorm_fn_


def rms_norm_gated_keywords(label: str, backend: str | None) -> Callable:
    """sglang's ``rms_norm_gated(*, x, ...)`` (keyword-only; z may be (T, H, N) for a 2-D x)."""

    def rms_norm_gated(*, x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True,
                       is_rms_norm=False, activation: str = "swish"):
        name = hit(label, backend, x.device)
        return layernorm_fn(x, weight, bias, z, eps, group_size, bool(norm_before_gate), bool(is_rms_norm),
                            activation=activation, backend=name)

    return rms_norm_gated


def rms_norm_gated_positional(label: str, backend: str | None) -> Callable:
    """Older sglang's and vLLM's mamba copies: ``rms_norm_gated(x, weight, bias, z=None, ...)`` (always RMSNorm)."""

    def rms_norm_gated(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        name = hit(label, backend, x.device)
        return layernorm_fn(x, weight, bias, z, eps, group_size, bool(norm_before_gate), True, backend=name)

    return rms_norm_gated


# --- autograd.Function classes (``LayerNormFn``): forward and backward replaced, ``apply`` untouched ---


def autograd_function(label: str, backend: str | None, original_forward: Callable) -> tuple[Callable, Callable]:
    """``forward(ctx, *args)``/``backward(ctx, dy)`` for an upstream ``LayerNormFn``.

    The arguments are bound with the upstream forward's own signature (so its order and
    defaults hold exactly: ``x, weight, bias, z, eps, group_size, norm_before_gate,
    is_rms_norm[, activation]``), and backward returns one gradient per argument passed.
    Only x, weight, bias, z, mean and rstd are saved. sglang's forward-only class gains a backward.
    """
    sig = inspect.signature(original_forward)

    def forward(ctx, *args):
        bound = sig.bind(ctx, *args)
        bound.apply_defaults()
        a = bound.arguments
        x, weight, bias, z = a["x"], a["weight"], a["bias"], a.get("z")
        name = hit(label, backend, x.device)
        call = prepare(x, weight, bias, z, a.get("eps", 1e-6), a.get("group_size"),
                       bool(a.get("norm_before_gate", True)), bool(a.get("is_rms_norm", False)),
                       a.get("activation", "swish"))
        s = call.spec
        y, mean, rstd = gated_norm_rows(call.x2d, weight, bias, call.z2d, s, backend=name)  # no grad in here
        ctx.save_for_backward(call.x2d, weight, bias, call.z2d, mean, rstd)
        ctx.gatednorm = (s, name, x.shape, None if z is None else z.shape, len(args))
        return y.view(x.shape)

    def backward(ctx, dy):
        x2d, weight, bias, z2d, mean, rstd = ctx.saved_tensors
        s, name, x_shape, z_shape, nargs = ctx.gatednorm
        need = ctx.needs_input_grad
        needs_dz = z2d is not None and len(need) > 3 and need[3]
        needs_db = bias is not None and need[2]
        dx, dz, dw, db = gated_norm_rows_backward(
            dy.reshape(x2d.shape), x2d, weight, bias, z2d, mean, rstd, s, backend=name,
            needs_dx=need[0], needs_dz=needs_dz, needs_dweight=need[1], needs_dbias=needs_db,
        )
        grads = [
            dx.view(x_shape) if need[0] else None,
            dw if need[1] else None,
            db if needs_db else None,
            dz.view(z_shape) if needs_dz else None,
        ]
        return tuple(grads[:nargs]) + (None,) * max(0, nargs - 4)

    backward = torch.autograd.function.once_differentiable(backward)
    return forward, backward


# --- nn.Module forwards of the upstream gated-norm modules (state_dict unchanged: same class, same params) ---


def module_forward(label: str, backend: str | None, is_rms_norm: bool) -> Callable:
    """``forward(self, x, z=None)`` reading the upstream module's ``weight``/``bias``/``eps``/
    ``group_size``/``norm_before_gate`` (and ``activation`` where the class has one)."""

    def forward(self, x, z=None):
        name = hit(label, backend, x.device)
        return layernorm_fn(x, self.weight, self.bias, z, self.eps, self.group_size, bool(self.norm_before_gate),
                            is_rms_norm, activation=getattr(self, "activation", "swish"), backend=name)

    return forward


def mixer2_forward_native(label: str, backend: str | None, original: Callable) -> Callable:
    """``forward_native(self, x, gate)`` of vLLM's / sglang's tensor-parallel ``Mixer2RMSNormGated``: the RMSNorm of
    ``x * silu(gate)`` over ``n_groups`` groups of the full hidden size, x, gate and ``weight`` this rank's shard.

    gatednorm serves the calls a rank finishes alone: one rank, or whole groups on every rank (``tp_size`` divides
    ``n_groups``). The rest keep upstream's code (``original``): a group split over ranks needs upstream's
    collectives (an all_reduce of one group, an all_gather where groups straddle ranks), and ``use_rms_norm=False``
    is a plain gate without a norm. The output dtype is upstream's, ``weight * y.to(x.dtype)``'s: the promoted dtype
    of weight and x (x and gate upcast exactly where the weight is wider, so the one rounding lands on it)."""

    def forward_native(self, x, gate):
        if not self.use_rms_norm or self.n_groups % self.tp_size:
            return original(self, x, gate)
        name = hit(label, backend, x.device)
        out_dtype = torch.promote_types(self.weight.dtype, x.dtype)
        if out_dtype != x.dtype:
            x, gate = x.to(out_dtype), gate.to(out_dtype)
        return layernorm_fn(x, self.weight, None, gate, self.variance_epsilon, self.group_size, False, True,
                            backend=name)

    return forward_native


# --- fused_norm_gate (fla and sglang): residual, prenorm and the norm + gate + linear variants ---


def _ones_like_weight(weight, x):
    return weight if weight is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)


def _gate_rows(x, g):
    """The gate as gatednorm takes it: x's shape, or kept as (T, H, N) beside a (T*H, N) x (sglang passes
    a strided view of the packed projection; reshaping it would copy). Other shapes of x's size are
    reshaped, as upstream's ``g.reshape(-1, D)`` does."""
    if g.shape == x.shape:
        return g
    if x.dim() == 2 and g.dim() == 3 and g.shape[0] * g.shape[1] == x.shape[0] and g.shape[2] == x.shape[1]:
        return g
    return g.reshape(x.shape) if g.numel() == x.numel() else g  # anything else: prepare names the mismatch


def _fused(label, backend, x, g, weight, bias, activation, eps, is_rms_norm, residual, prenorm, residual_in_fp32):
    name = hit(label, backend, x.device)
    return layernorm_fn(x, _ones_like_weight(weight, x), bias, _gate_rows(x, g), eps, None, True, is_rms_norm,
                        activation=activation, residual=residual, prenorm=bool(prenorm),
                        residual_in_fp32=bool(residual_in_fp32), backend=name)


def fused_function(label: str, backend: str | None, is_rms_norm: bool) -> Callable:
    """``rms_norm_gated``/``layer_norm_gated(x, g, weight, bias, activation, residual, prenorm,
    residual_in_fp32, eps)``: ``norm(x [+ residual]) * act(g)`` over the whole last dim; with ``prenorm``
    ``(y, residual_out)``, residual_out in residual's dtype (float32 for ``residual_in_fp32`` without one)."""

    def fused(x, g, weight, bias, activation: str = "swish", residual=None, prenorm=False, residual_in_fp32=False,
              eps=1e-6):
        return _fused(label, backend, x, g, weight, bias, activation, eps, is_rms_norm, residual, prenorm,
                      residual_in_fp32)

    fused.__name__ = "rms_norm_gated" if is_rms_norm else "layer_norm_gated"
    return fused


def fused_module_forward(label: str, backend: str | None, is_rms_norm: bool) -> Callable:
    """``FusedRMSNormGated``/``FusedLayerNormGated.forward(x, g, residual, prenorm, residual_in_fp32)``."""

    def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        return _fused(label, backend, x, g, self.weight, self.bias, self.activation, self.eps, is_rms_norm, residual,
                      prenorm, residual_in_fp32)

    return forward


def _fused_linear(label, backend, x, g, norm_weight, norm_bias, linear_weight, linear_bias, residual, prenorm,
                  residual_in_fp32, eps, is_rms_norm):
    # fla's *_gate_linear variants take no activation: their kernel runs the default, swish
    name = hit(label, backend, x.device)
    return layernorm_linear_fn(x, _ones_like_weight(norm_weight, x), norm_bias, g.reshape(x.shape), linear_weight,
                               linear_bias, eps, None, True, is_rms_norm, residual=residual, prenorm=bool(prenorm),
                               residual_in_fp32=bool(residual_in_fp32), backend=name)


def fused_linear_function(label: str, backend: str | None, is_rms_norm: bool) -> Callable:
    """fla's ``layer_norm_swish_gate_linear``/``rms_norm_swish_gate_linear(x, g, norm_weight, norm_bias,
    linear_weight, linear_bias, residual, prenorm, residual_in_fp32, eps)``: ``linear(norm(x) * swish(g))``
    with the memory-saving backward (:func:`gatednorm.functional.layernorm_linear_fn`)."""

    def fused_linear(x, g, norm_weight, norm_bias, linear_weight, linear_bias, residual=None, prenorm=False,
                     residual_in_fp32=False, eps=1e-6):
        return _fused_linear(label, backend, x, g, norm_weight, norm_bias, linear_weight, linear_bias, residual,
                             prenorm, residual_in_fp32, eps, is_rms_norm)

    fused_linear.__name__ = "rms_norm_swish_gate_linear" if is_rms_norm else "layer_norm_swish_gate_linear"
    return fused_linear


def fused_linear_module_forward(label: str, backend: str | None, is_rms_norm: bool) -> Callable:
    """``FusedLayerNormGatedLinear``/``FusedRMSNormGatedLinear.forward(x, g, weight, bias, residual, prenorm,
    residual_in_fp32)``: weight and bias are the linear layer's; the module's own are the norm's."""

    def forward(self, x, g, weight=None, bias=None, residual=None, prenorm=False, residual_in_fp32=False):
        return _fused_linear(label, backend, x, g, self.weight, self.bias, weight, bias, residual, prenorm,
                             residual_in_fp32, self.eps, is_rms_norm)

    return forward

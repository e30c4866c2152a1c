"""The module name of the original migration guide, kept so its imports work unchanged::

    from layernorm_native_implementation import layernorm_fn_native, _layer_norm_fwd_native

Everything here is gatednorm's native backend.
"""

from gatednorm import (
    _layer_norm_fwd_native,
    layernorm_fn_native,
    rmsnorm_fn_native,
    simple_layernorm_native,
)

__all__ = ["_layer_norm_fwd_native", "layernorm_fn_native", "rmsnorm_fn_native", "simple_layernorm_native"]

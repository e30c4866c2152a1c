"""Backends: implementations of the :class:`~gatednorm.backends.base.Backend` protocol.

Only :mod:`gatednorm.ops` imports them (through its registry); no backend imports another.

* :mod:`.native_cpu`: plain PyTorch on CPU, cache-sized row blocks, batch invariant.
* :mod:`.native_accel`: plain PyTorch on every other device, whole-tensor formulas of :mod:`gatednorm.numerics`.
* :mod:`.compiled`: the same formulas under ``torch.compile``.
* :mod:`.triton`: fused Triton kernels (optional dependency).
"""

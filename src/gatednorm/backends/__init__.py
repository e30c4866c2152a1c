"""Backends: implementations of the :class:`~gatednorm.backends.base.Backend` protocol.

Only :mod:`gatednorm.ops` imports them (through its registry); no backend imports another.

* :mod:`.native_cpu`: plain PyTorch on CPU; small row blocks whose ops run serially, taken as tasks
  by worker threads, so a busy core delays one task, not every op; batch invariant.
* :mod:`.native_accel`: plain PyTorch on every other device, whole-tensor formulas of :mod:`gatednorm.numerics`.
* :mod:`.compiled`: the same formulas under ``torch.compile``.
* :mod:`.triton`: fused Triton kernels (optional dependency).
"""

"""Eager plans of the triton backend: the launches of one call signature, decided once.

:mod:`gatednorm.ops` keeps a plan per call signature (docs/design.md, "Eager plans") and asks the backend for
its launch plans there (``TritonBackend.plan_forward`` / ``plan_backward`` / ``plan_forward_quant``). A
:class:`ForwardPlan`, :class:`BackwardPlan` or :class:`QuantPlan` works out, from the signature alone, what
:func:`.launch.forward`, :func:`.launch.backward` and :func:`.launch.forward_quant` decide on every call (launch
shapes, grids, constexprs, argument lists), and at a call finds the launchers :func:`.launch._launch` cached for
the same keys: the same compiled kernels with the same arguments, so the same bits (tests/test_gpu.py), for a
fraction of the host time.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import torch
import triton

from ...spec import NormSpec, QuantSpec, quant_dtype
from ..base import Grads, GradsNeeded
from . import cxx_plans
from .kernels import bwd_kernel, fwd_kernel, fwd_quant_kernel, quant_rescue_kernel, rescue_kernel, sum_partials_kernel
from .launch import (
    _COMPILED,
    _FAST_LAUNCH,
    _INTERPRET,
    _NEVER,
    MAX_GRID_Y,
    ORDER_FLAT,
    ORDER_GROUPS_FASTEST,
    PDL_MAX_ELEMENTS,
    RESCUE_SCAN_ROWS,
    _bwd_config,
    _bwd_kernel_constexprs,
    _bwd_programs,
    _current_cuda_device,
    _fp8_by_bits,
    _fwd_config,
    _fwd_flags,
    _fwd_kernel_constexprs,
    _partials_alloc,
    _partials_config,
    _quant_config,
    _quant_grid,
    _quant_kernel_constexprs,
    _sm_count,
    gpu_model_of,
    pdl_supported,
    quant_layout,
    quant_rescue_scan_min_elements,
    rescue_scan_min_elements,
    rescue_scan_pdl,
)


def _aligned_spec(args: tuple) -> tuple:
    """:func:`.launch._spec_key`'s key for runtime arguments given as they will be at launch, except that each tensor
    is given by its dtype and stands for one at a 16-byte aligned address (what a :class:`ForwardPlan` serves;
    tests/test_plans.py checks the two keys agree on real aligned tensors)."""
    key = []
    for v in args:
        if v is None or v.__class__ is int:
            key.append(v if v is None else (v == 1, not v & 15, -(2**31) <= v < 2**31))
        elif isinstance(v, torch.dtype):
            key.append((v, True))
        else:  # bool, float
            key.append(v.__class__)
    return tuple(key)


def _launch_hooks(index: int) -> tuple | None:
    """(enter, exit) hooks to pass the launcher, as :func:`.launch._launch` passes them; None where a plan must
    hand the call back: the launch's GPU is not current, or an enter hook wants launch metadata (a profiler
    such as proton has hooked in; _launch builds the metadata from the tensors)."""
    hooks = triton.knobs.runtime
    enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
    if index != _current_cuda_device() or (enter is not None and getattr(enter, "calls", True)):
        return None
    return enter, leave


def _ready(entry: tuple, tail: tuple) -> tuple:
    """A launch a plan repeats on every call: the launcher :func:`.launch._launch` cached (``entry``) with the
    arguments that follow a call's own ones (``tail``: row strides, eps, then the constexprs), as
    :func:`_fire` takes it: (C launch function or None, compiled.run, CUfunction, packed metadata, cooperative
    flag, PDL flag, tail). Built once per plan variant, so a call unpacks one tuple."""
    _, run, function, packed, direct, cooperative, pdl_flag = entry
    return direct, run, function, packed, cooperative, pdl_flag, tail


def _fire(ready: tuple, grid0: int, grid1: int, stream: int, enter, leave, pointers: Sequence, tensors: Sequence,
          head: tuple) -> None:
    """Launch a :func:`_ready` launch as :func:`.launch._launch` launches it: the C launch function with the
    tensors' addresses (``pointers``), else ``compiled.run`` with the tensors; ``head``: the call's own integer
    arguments that come before the ready tail (M, ...)."""
    direct, run, function, packed, cooperative, pdl_flag, tail = ready
    if direct is not None:
        direct(grid0, grid1, 1, stream, function, cooperative, pdl_flag, None, None, packed, None, enter, leave,
               *pointers, *head, *tail)
    else:
        run(grid0, grid1, 1, stream, function, packed, None, enter, leave, *tensors, *head, *tail)


def _rows_and_pdl(x: torch.Tensor, n: int, pdl: bool | None, pdl_ok: bool) -> tuple[int, bool] | None:
    """(M, whether to launch with PDL: ``pdl``, or by the call's size where the backend left it None) of a call on
    x's rows of n features; None where a plan does not serve it (M = 0, M >= 2^31)."""
    numel = x.numel()
    m = numel // n
    if m == 0 or m >= 2**31:
        return None
    return m, (pdl if pdl is not None else (numel < PDL_MAX_ELEMENTS and pdl_ok))


def _variant_launches(plan, variant: tuple[bool, ...], kernel, rescue, spec: tuple) -> tuple | None:
    """The launches of a quantized plan's variant (M == 1, M % 16 == 0, USE_PDL, GROUPS_FASTEST, rescue after):
    :func:`_kernel_and_rescue` for the plan's constexprs of that variant, each made :func:`_ready` with its
    constexprs as the tail, remembered in ``plan.variants`` (and the launchers' entries in ``plan.entries``,
    handed to the plan's C++ entry where it is attached) once both are compiled (None until then)."""
    _, _, pdl, groups_fastest, after = variant
    constexprs = plan.constexprs[(pdl, groups_fastest, after)]
    entries = _kernel_and_rescue(kernel, rescue, plan.index, plan.warps, pdl, constexprs, spec, after, plan.rescue_pdl)
    if entries is None:
        return None
    launches = (_ready(entries[0], constexprs[0]), None if entries[1] is None else _ready(entries[1], constexprs[1]))
    plan.variants[variant] = launches
    plan.entries[variant] = entries
    if plan.native is not None:
        _register(plan.native, variant, entries, plan.call_args)
    return launches


def _kernel_and_rescue(kernel, rescue, index: int, warps: int, pdl: bool, constexprs: tuple, spec: tuple,
                       after: bool, rescue_pdl: bool) -> tuple | None:
    """(kernel's launcher, rescue's or None): what :func:`.launch._launch` cached for a forward kernel and, where the
    range rescue runs after it, for its rescue kernel (the forward's warps and arguments; ``constexprs`` the pair
    of their constexpr tuples); None where one of them is not compiled yet."""
    fwd = _COMPILED.get((kernel, index, warps, pdl, constexprs[0], spec))
    after_launcher = _COMPILED.get((rescue, index, warps, rescue_pdl, constexprs[1], spec)) if after else None
    if fwd is None or (after and after_launcher is None):
        return None
    return fwd, after_launcher


#: cxx_plans.cpp's kMaxArgs: the most arguments (constexprs included) a kernel it launches may have.
_MAX_ARGS = 48


class _KernelLaunch(ctypes.Structure):
    """cxx_plans.cpp's KernelLaunch: a compiled kernel as its C++ entry launches it (function 0: none yet)."""

    _fields_ = [("function", ctypes.c_uint64), ("num_warps", ctypes.c_int32), ("num_ctas", ctypes.c_int32),
                ("shared_memory", ctypes.c_int32), ("cooperative", ctypes.c_int32), ("pdl", ctypes.c_int32),
                ("num_args", ctypes.c_int32), ("kinds", ctypes.c_int8 * _MAX_ARGS)]


class _ForwardPlanState(ctypes.Structure):
    """cxx_plans.cpp's ForwardPlanState: what a :class:`ForwardPlan` decided, for its C++ entry."""

    _fields_ = [("n", ctypes.c_int64), ("groups", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("scan_rows", ctypes.c_int64), ("rescue_min", ctypes.c_int64), ("pdl_max_elements", ctypes.c_int64),
                ("max_grid_y", ctypes.c_int64), ("pdl_mode", ctypes.c_int32), ("pdl_ok", ctypes.c_int32),
                ("groups_fastest", ctypes.c_int32), ("is_rms", ctypes.c_int32), ("device_index", ctypes.c_int32),
                ("on_cuda", ctypes.c_int32), ("fixed", ctypes.c_int64 * 5), ("eps", ctypes.c_double),
                ("variants", (_KernelLaunch * 2) * 32)]


class _BackwardVariant(ctypes.Structure):
    """cxx_plans.cpp's BackwardVariant: a backward variant's key (-1: a free slot) and its two launches."""

    _fields_ = [("key", ctypes.c_int32), ("pad", ctypes.c_int32), ("bwd", _KernelLaunch), ("part", _KernelLaunch)]


class _BackwardPlanState(ctypes.Structure):
    """cxx_plans.cpp's BackwardPlanState: what a :class:`BackwardPlan` decided, for its C++ entry."""

    _fields_ = [("n", ctypes.c_int64), ("groups", ctypes.c_int64), ("rows", ctypes.c_int64), ("sms", ctypes.c_int64),
                ("per_sm", ctypes.c_int64), ("pdl_max_elements", ctypes.c_int64), ("max_grid_y", ctypes.c_int64),
                ("block_n", ctypes.c_int64), ("x_stride", ctypes.c_int64), ("z_stride", ctypes.c_int64),
                ("pdl_mode", ctypes.c_int32), ("pdl_ok", ctypes.c_int32), ("groups_fastest_order", ctypes.c_int32),
                ("zero_partials", ctypes.c_int32), ("device_index", ctypes.c_int32), ("on_cuda", ctypes.c_int32),
                ("variants", _BackwardVariant * 16)]


class _QuantPlanState(ctypes.Structure):
    """cxx_plans.cpp's QuantPlanState: what a :class:`QuantPlan` decided, for its C++ entry."""

    _fields_ = [("n", ctypes.c_int64), ("groups", ctypes.c_int64), ("rows", ctypes.c_int64), ("tiles", ctypes.c_int64),
                ("scan_rows", ctypes.c_int64), ("rescue_min", ctypes.c_int64), ("pdl_max_elements", ctypes.c_int64),
                ("max_grid_y", ctypes.c_int64), ("pdl_mode", ctypes.c_int32), ("pdl_ok", ctypes.c_int32),
                ("groups_fastest_order", ctypes.c_int32), ("column_major", ctypes.c_int32),
                ("device_index", ctypes.c_int32), ("on_cuda", ctypes.c_int32), ("fixed", ctypes.c_int64 * 3),
                ("eps", ctypes.c_double), ("variants", (_KernelLaunch * 2) * 32)]


def _layout_matches(module) -> bool:
    """Whether the extension's structs have the sizes and offsets of the ctypes mirrors above."""
    return module.layout() == (
        ctypes.sizeof(_KernelLaunch), ctypes.sizeof(_ForwardPlanState), _ForwardPlanState.fixed.offset,
        _ForwardPlanState.variants.offset, _KernelLaunch.kinds.offset, ctypes.sizeof(_BackwardVariant),
        ctypes.sizeof(_BackwardPlanState), _BackwardPlanState.variants.offset, ctypes.sizeof(_QuantPlanState),
        _QuantPlanState.fixed.offset, _QuantPlanState.variants.offset)


def _start_native(plan, wanted: bool) -> None:
    """A new plan's C++ entry fields (``native``: its ctypes state, ``native_address``: the state's address, both
    set by the plan's ``_attach``; ``native_wanted``: whether to attach, asked again on calls while the extension
    builds), then its first attempt to attach where the entry is wanted."""
    plan.native, plan.native_address, plan.native_wanted = None, 0, wanted
    if wanted:
        plan._attach()


def _extension_for(plan):
    """The C++ entry's extension for a plan's ``_attach``: None while it builds (``plan.native_wanted`` stays set:
    the plan asks again on its next call) or where it cannot serve (a failed build, other struct layouts: the
    plan stops asking)."""
    module = cxx_plans.extension(wait=False)
    if module is None:
        plan.native_wanted = not cxx_plans.settled()
        return None
    plan.native_wanted = False
    return module if _layout_matches(module) else None


#: cxx_plans.cpp's ArgKind of each signature type a Triton 3.6 launcher passes by value ('*...': a pointer, 1).
_ARG_KINDS = {"constexpr": 0, "i32": 2, "i64": 3, "fp32": 4}
#: Per kind, the arguments of a call that may take it: "p" a tensor, "-" None, "i" an int, "f" a float.
_KIND_TAKES = {0: "-i", 1: "p", 2: "i", 3: "i", 4: "f"}


def _host_launch(entry: tuple, call_args: str) -> _KernelLaunch | None:
    """The record cxx_plans.cpp launches a launcher :func:`.launch._launch` cached (``entry``) from, or None
    where it cannot repeat Triton's launch: no C launch function in the entry (another Triton than the C++
    repeats, scratch memory, tensor descriptors), a cluster launch, a signature type it does not pass, or a
    signature that disagrees with the call's arguments (``call_args``: per runtime argument its class, as
    _KIND_TAKES spells them; the constexprs after them must be constexpr in the signature)."""
    compiled, _, function, packed, direct, cooperative, pdl_flag = entry
    signature = getattr(getattr(compiled, "src", None), "signature", None)
    if direct is None or not isinstance(signature, dict) or len(signature) > _MAX_ARGS or packed[1] != 1:
        return None
    kinds = []
    for i, ty in enumerate(signature.values()):
        kind = 1 if isinstance(ty, str) and ty.startswith("*") else _ARG_KINDS.get(ty)
        if kind is None or (call_args[i] not in _KIND_TAKES[kind] if i < len(call_args) else kind != 0):
            return None
        kinds.append(kind)
    record = _KernelLaunch(function=function, num_warps=packed[0], num_ctas=1, shared_memory=packed[2],
                           cooperative=cooperative, pdl=pdl_flag, num_args=len(kinds))
    record.kinds[:len(kinds)] = kinds
    return record


def _register(state, variant: tuple[bool, ...], entries: tuple, call_args: str) -> None:
    """Give a plan's C++ state (ForwardPlanState or QuantPlanState: a kernel and its rescue kernel per variant) a
    variant's launches; none where :func:`_host_launch` refuses one of them (the variant then stays with the
    Python call)."""
    fwd, rescue = (_host_launch(entry, call_args) if entry is not None else None for entry in entries)
    if fwd is None or (entries[1] is not None and rescue is None):
        return
    pair = state.variants[_variant_index(variant)]
    pair[0] = fwd
    if rescue is not None:
        pair[1] = rescue


def _pointers(*present: bool) -> str:
    """:func:`_host_launch`'s classes of pointer arguments: "p" for a tensor, "-" for None."""
    return "".join("p" if p else "-" for p in present)


def _variant_index(variant: tuple) -> int:
    """cxx_plans.cpp's index (forward) or key (backward) of a plan's variant: its flags as bits, in order, a
    nested tuple's (GradsNeeded) in place."""
    index = 0
    for flag in variant:
        if isinstance(flag, tuple):
            for inner in flag:
                index = index << 1 | bool(inner)
        else:
            index = index << 1 | bool(flag)
    return index


#: Forward launches made through a :class:`ForwardPlan` in Python (a diagnostic for benchmarks and tests; those
#: of its C++ entry: :func:`forward_plan_launches`).
planned_launches = 0


def forward_plan_launches() -> int:
    """Forward launches made through :class:`ForwardPlan` s, in Python or their C++ entry."""
    module = cxx_plans.loaded()
    return planned_launches + (0 if module is None else module.launches()[0])


def backward_plan_launches() -> int:
    """Backward launches made through :class:`BackwardPlan` s, in Python or their C++ entry."""
    module = cxx_plans.loaded()
    return planned_backward_launches + (0 if module is None else module.launches()[1])


def quant_plan_launches() -> int:
    """Fused quantized forwards launched through :class:`QuantPlan` s, in Python or their C++ entry."""
    module = cxx_plans.loaded()
    return planned_quant_launches + (0 if module is None else module.launches()[2])


class ForwardPlan:
    """The forward launches of one call signature, decided once (docs/design.md, "Eager plans").

    A signature is what :func:`forward` decides from: the dtypes and devices of x, z, weight and bias, N,
    the row strides of x and z (2-D tensors, unit stride along features; or contiguous ones of any rank,
    rows of N), the NormSpec and the backend's options. Everything but M is fixed by it, so the launch
    shape, the constexprs and the argument list are worked out here, and a call only allocates the
    outputs, reads the addresses and calls the launchers that :func:`_launch` cached for the same keys:
    fwd_kernel, and rescue_kernel after it for calls of at least ``rescue_kernel_min_elements`` elements
    (the range rescue as a second kernel, as :func:`forward` runs it). The same compiled kernels, grids and
    arguments as :func:`forward`, hence the same bits (tests/test_gpu.py::test_forward_plan_matches_plain_launch).

    Calling it with tensors of the signature returns ``(y, mean | None, rstd)``, y new and in x's shape
    and dtype, or None, having written nothing, where the plan does not serve the call: M = 0, an address
    not 16-byte aligned, x's GPU not the current device, a Triton launch hook that takes metadata, or a
    kernel variant (M = 1, M divisible by 16, PDL, program order, rescue in the kernel or after it) that
    no plain launch has compiled yet. The caller then takes the plain path, which compiles it.
    """

    __slots__ = ("n", "groups", "rows", "warps", "device", "index", "pdl", "pdl_ok", "rescue_pdl", "rescue_min",
                 "scan_rows", "fixed_args", "is_rms", "groups_fastest", "constexprs", "arg_dtypes", "variants",
                 "entries", "call_args", "native", "native_forward", "native_address", "native_wanted")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                 spec: NormSpec, rescue_kernel_min_elements: int | None, rescue_scan_rows: int,
                 pdl: bool | None, output_only: bool = False) -> None:
        n = x.shape[-1]
        gs = spec.group_size
        block, chunks, rows, warps, order = _fwd_config(gs, x.element_size(), gpu_model_of(x), output_only)
        self.n, self.groups, self.rows, self.warps = n, n // gs, rows, warps
        self.device = x.device
        self.index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        self.pdl, self.pdl_ok = pdl, pdl_supported(x.device)
        self.rescue_pdl = rescue_scan_pdl(pdl, x.device)  # the scan after a large forward, as the backend launches it
        # forward's rescue_after: by the group width (narrow groups check in-kernel at every size); wide groups
        # (several chunks) always rescue inside the kernel
        self.rescue_min = rescue_scan_min_elements(rescue_kernel_min_elements, gs) if chunks == 1 else _NEVER
        self.scan_rows = rescue_scan_rows
        self.is_rms = spec.is_rms_norm
        self.groups_fastest = order == ORDER_GROUPS_FASTEST and self.groups > 1
        flags = _fwd_flags(spec, z is not None, bias is not None)
        #: (USE_PDL, GROUPS_FASTEST, rescue after) -> (fwd_kernel's constexprs, rescue_kernel's or None), no residual
        self.constexprs = {
            (p, g, after): (_fwd_kernel_constexprs(gs, block, rows, chunks, flags, not after, p, g, False, False),
                            (gs, block, rescue_scan_rows, *flags, self.rescue_pdl, False) if after else None)
            for p in (False, True) for g in (False, True) for after in (False, True)}
        row_stride = x.stride(0) if x.dim() == 2 else n
        z_stride = 0 if z is None else (z.stride(0) if z.dim() == 2 else n)
        # the runtime arguments after m: x, z and y's row strides (no residual), eps; forward's order
        self.fixed_args = (row_stride, 0, z_stride, n, 0, spec.eps)
        f32 = torch.float32
        self.arg_dtypes = (x.dtype, None, None if z is None else z.dtype, weight.dtype,
                           None if bias is None else bias.dtype, x.dtype, None, None if self.is_rms else f32, f32)
        #: (M == 1, M % 16 == 0, USE_PDL, GROUPS_FASTEST, rescue after) -> the launches, see _launches
        self.variants: dict[tuple[bool, ...], tuple] = {}
        #: the same variants -> the launchers' cache entries (fwd_kernel's, rescue_kernel's or None)
        self.entries: dict[tuple[bool, ...], tuple] = {}
        # the runtime arguments' classes in forward's order, as _host_launch checks a signature against them
        # (x, residual, z, weight, bias, y, residual_out, mean, rstd, m, five row strides, eps)
        self.call_args = _pointers(True, False, z is not None, True, bias is not None, True, False,
                                   not self.is_rms, True) + "i" * 6 + "f"
        # the C++ entry (cxx_plans.cpp): its state, its forward function and the state's address, once attached
        self.native_forward = None
        _start_native(self, cxx_plans.ENABLED)

    def _attach(self) -> None:
        """Hand this plan's decisions to the C++ entry once its extension is loaded (its build runs on a background
        thread; until then every call comes back here, and stops once the build has failed)."""
        module = _extension_for(self)
        if module is None:
            return
        state = _ForwardPlanState(
            n=self.n, groups=self.groups, rows=self.rows, scan_rows=self.scan_rows, rescue_min=self.rescue_min,
            pdl_max_elements=PDL_MAX_ELEMENTS, max_grid_y=MAX_GRID_Y,
            pdl_mode=-1 if self.pdl is None else int(self.pdl), pdl_ok=int(self.pdl_ok),
            groups_fastest=int(self.groups_fastest), is_rms=int(self.is_rms), device_index=self.index,
            on_cuda=int(self.device.type == "cuda"), eps=self.fixed_args[5])
        state.fixed[:] = self.fixed_args[:5]
        self.native = state
        for variant, entries in self.entries.items():
            _register(state, variant, entries, self.call_args)
        self.native_forward, self.native_address = module.forward, ctypes.addressof(state)

    def _launches(self, variant: tuple[bool, ...], m: int) -> tuple | None:
        """(fwd_kernel's :func:`_ready` launch, rescue_kernel's or None) of this variant, from the launchers
        :func:`_launch` cached (None: one is not compiled yet); remembered in ``variants``."""
        _, _, pdl, groups_fastest, after = variant
        constexprs = self.constexprs[(pdl, groups_fastest, after)]
        entries = _kernel_and_rescue(fwd_kernel, rescue_kernel, self.index, self.warps, pdl, constexprs,
                                     _aligned_spec((*self.arg_dtypes, m, *self.fixed_args)), after, self.rescue_pdl)
        if entries is None:
            return None
        fwd, rescue = entries
        launches = (_ready(fwd, (*self.fixed_args, *constexprs[0])),
                    None if rescue is None else _ready(rescue, (*self.fixed_args, *constexprs[1])))
        self.variants[variant] = launches
        self.entries[variant] = entries
        if self.native is not None:
            _register(self.native, variant, entries, self.call_args)
        return launches

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        # Every call of a repeated signature runs this: written flat (no helper calls, one tuple per launch
        # unpacked), as each Python step costs about 0.1 us of a launch-bound call's host time. First the C++
        # entry, which makes the whole call where its variant is registered (None: it did nothing).
        forward = self.native_forward
        if forward is not None:
            done = forward(self.native_address, x, z, weight, bias)
            if done is not None:
                return done
        elif self.native_wanted:
            self._attach()
        numel = x.numel()
        m = numel // self.n
        if m == 0 or m >= 2**31:
            return None
        pdl = self.pdl if self.pdl is not None else (numel < PDL_MAX_ELEMENTS and self.pdl_ok)
        tiles = -(-m // self.rows)
        groups_fastest = self.groups_fastest and tiles <= MAX_GRID_Y
        after = numel >= self.rescue_min
        variant = (m == 1, not m & 15, pdl, groups_fastest, after)
        launches = self.variants.get(variant) or self._launches(variant, m)
        hooks = None if launches is None else _launch_hooks(self.index)
        if hooks is None:
            return None
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        rstd = torch.empty(self.groups * m, dtype=torch.float32, device=self.device)
        mean = None if self.is_rms else torch.empty(self.groups * m, dtype=torch.float32, device=self.device)
        xp, wp, yp, rp = x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr()
        zp = None if z is None else z.data_ptr()
        bp = None if bias is None else bias.data_ptr()
        mp = None if mean is None else mean.data_ptr()
        if (xp | wp | yp | rp | (zp or 0) | (bp or 0) | (mp or 0)) & 15:
            return None
        global planned_launches
        planned_launches += 1
        stream = torch._C._cuda_getCurrentRawStream(self.index)
        enter, leave = hooks
        grid0, grid1 = (self.groups, tiles) if groups_fastest else (tiles, self.groups)
        fwd, rescue = launches
        direct, run, function, packed, cooperative, pdl_flag, tail = fwd
        if direct is not None:  # the pointers in forward's order: x, residual, z, weight, bias, y, residual_out, ...
            direct(grid0, grid1, 1, stream, function, cooperative, pdl_flag, None, None, packed, None, enter, leave,
                   xp, None, zp, wp, bp, yp, None, mp, rp, m, *tail)
        else:
            run(grid0, grid1, 1, stream, function, packed, None, enter, leave, x, None, z, weight, bias, y, None,
                mean, rstd, m, *tail)
        if rescue is not None:  # rescue_kernel: the forward's arguments and warps, a program per SCAN rows of a group
            _fire(rescue, -(-m // self.scan_rows), self.groups, stream, enter, leave,
                  (xp, None, zp, wp, bp, yp, None, mp, rp), (x, None, z, weight, bias, y, None, mean, rstd), (m,))
        return y, mean, rstd


def plan_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                 spec: NormSpec, rescue_kernel_min_elements: int | None = None,
                 rescue_scan_rows: int = RESCUE_SCAN_ROWS, pdl: bool | None = None,
                 fast: bool = True, output_only: bool = False) -> ForwardPlan | None:
    """A :class:`ForwardPlan` for the signature of these tensors, or None where :func:`forward` would not
    take its one-kernel path through the cached launcher: not a CUDA tensor, the fast launch off, the flat
    program order, rows that are not 2-D with unit feature stride or contiguous, strided parameters.
    ``output_only``: the plan of calls that discard the statistics, at :func:`forward`'s launch shape for them
    (FWD_OUTPUT_TUNED_BY_MODEL; it still returns them, computed as scratch)."""
    if not _plannable(x, weight, bias, z, spec, fast, output_only):
        return None
    return ForwardPlan(x, weight, bias, z, spec, rescue_kernel_min_elements, rescue_scan_rows, pdl, output_only)


def _plannable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
               spec: NormSpec, fast: bool, output_only: bool = False) -> bool:
    """Whether the forward and backward plans serve this signature (see :func:`plan_forward`)."""
    return (_rows_plannable(x, weight, bias, z, fast)
            and _fwd_config(spec.group_size, x.element_size(), gpu_model_of(x), output_only)[4] != ORDER_FLAT)


def _rows_plannable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                    fast: bool) -> bool:
    """CUDA tensors with the cached launcher on; x and z 2-D with unit feature stride or contiguous rows of any
    rank; unit-stride parameters: the layouts a plan reads its row strides from."""
    if not (fast and _FAST_LAUNCH and x.device.type == "cuda"):
        return False
    for t in (x, z):
        if t is not None and (t.stride(-1) != 1 or not (t.dim() == 2 or t.is_contiguous())):
            return False
    return weight.stride(-1) == 1 and (bias is None or bias.stride(-1) == 1)


def plan_autograd(forward_plan: ForwardPlan | None, backward_plan: BackwardPlan | None):
    """The C++ entry's differentiable call bound to both plans' states (cxx_plans.cpp, ``autograd``: a
    GatedNormBackward node instead of the Python Function; see PlannedBackend.plan_autograd), None while either
    plan waits for the extension, False where either has no C++ entry."""
    if forward_plan is None or backward_plan is None:
        return False
    if forward_plan.native_forward is None or backward_plan.native_backward is None:
        if forward_plan.native_wanted or backward_plan.native_wanted:
            return None
        return False
    module = cxx_plans.loaded()  # both plans are attached to it
    return functools.partial(module.autograd, forward_plan.native_address, backward_plan.native_address)


def plan_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                  spec: NormSpec, pdl: bool | None = None, fast: bool = True) -> BackwardPlan | None:
    """A :class:`BackwardPlan` for the signature of these tensors (those :func:`plan_forward` serves), else None."""
    return BackwardPlan(x, weight, bias, z, spec, pdl) if _plannable(x, weight, bias, z, spec, fast) else None


#: Backward launches made through a :class:`BackwardPlan` (a diagnostic for benchmarks and tests).
planned_backward_launches = 0


class BackwardPlan:
    """The backward launches (bwd_kernel, then sum_partials_kernel for dweight / dbias) of one call signature,
    decided once, as :class:`ForwardPlan` does for the forward: the same compiled kernels, grids and arguments
    as :func:`backward` (tests/test_gpu.py::test_backward_plan_matches_plain_launch).

    Called with the forward's saved (M, N) rows x and z (2-D, of the signature), the parameters, mean and rstd
    and dy (M, N), it returns ``(dx, dz, dweight, dbias)`` (None where not asked for), or None, having
    written nothing, where it does not serve the call: dy not of y's dtype or without unit stride along
    features, an address not 16-byte aligned, x's GPU not current, a Triton launch hook that takes metadata,
    a kernel variant no plain launch has compiled yet.
    """

    __slots__ = ("n", "gs", "groups", "block", "chunks", "rows", "warps", "per_sm", "groups_fastest_order", "device",
                 "index", "pdl", "pdl_ok", "spec", "has_z", "has_bias", "dtypes", "x_stride", "z_stride",
                 "partials", "variants", "sms", "alloc_partials", "entries", "native", "native_backward",
                 "native_address", "native_wanted")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                 spec: NormSpec, pdl: bool | None) -> None:
        n = x.shape[-1]
        self.n, self.gs, self.groups = n, spec.group_size, n // spec.group_size
        self.block, self.chunks, self.rows, self.warps, self.per_sm, self.groups_fastest_order = _bwd_config(
            spec.group_size, x.element_size())
        self.device = x.device
        self.index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        self.pdl, self.pdl_ok = pdl, pdl_supported(x.device)
        self.spec, self.has_z, self.has_bias = spec, z is not None, bias is not None
        # x, z, weight, bias dtypes (dy has x's: y's dtype, as the Function's forward wrote it)
        self.dtypes = (x.dtype, None if z is None else z.dtype, weight.dtype, None if bias is None else bias.dtype)
        self.x_stride = x.stride(0) if x.dim() == 2 else n
        self.z_stride = 0 if z is None else (z.stride(0) if z.dim() == 2 else n)
        self.partials = _partials_config(n)
        self.sms = _sm_count(x.device)
        self.alloc_partials = _partials_alloc(self.chunks)
        #: (M == 1, M % 16 == 0, dy's row stride's class, programs == 1, programs % 16 == 0, needs, USE_PDL,
        #: GROUPS_FASTEST) -> the launches, see _launches
        self.variants: dict[tuple, tuple] = {}
        #: the same variants -> (bwd_kernel's launcher cache entry, sum_partials_kernel's or None, needs)
        self.entries: dict[tuple, tuple] = {}
        # the C++ entry (cxx_plans.cpp), as ForwardPlan's
        self.native_backward = None
        _start_native(self, cxx_plans.ENABLED)

    def _attach(self) -> None:
        """Hand this plan's decisions to the C++ entry once its extension is loaded (as ForwardPlan._attach)."""
        module = _extension_for(self)
        if module is None:
            return
        state = _BackwardPlanState(
            n=self.n, groups=self.groups, rows=self.rows, sms=self.sms, per_sm=self.per_sm,
            pdl_max_elements=PDL_MAX_ELEMENTS, max_grid_y=MAX_GRID_Y, block_n=self.partials[1],
            x_stride=self.x_stride, z_stride=self.z_stride, pdl_mode=-1 if self.pdl is None else int(self.pdl),
            pdl_ok=int(self.pdl_ok), groups_fastest_order=int(self.groups_fastest_order),
            zero_partials=int(self.alloc_partials is torch.zeros), device_index=self.index,
            on_cuda=int(self.device.type == "cuda"))
        for slot in state.variants:
            slot.key = -1
        self.native = state
        for variant, entries in self.entries.items():
            self._register(variant, entries)
        self.native_backward, self.native_address = module.backward, ctypes.addressof(state)

    def _register(self, variant: tuple, entries: tuple) -> None:
        """Give the C++ entry a variant's launches, in a free slot (none left, or a launch :func:`_host_launch`
        refuses: the variant stays with the Python call)."""
        bwd_entry, part_entry, needs = entries
        # dy, x, z, weight, bias, mean, rstd, dx, dz, dweight's and dbias' partial rows, then 7 integers
        bwd = _host_launch(bwd_entry, _pointers(True, True, self.has_z, True, self.has_bias,
                                                not self.spec.is_rms_norm, True, *needs) + "i" * 7)
        part = None
        if part_entry is not None:  # the partial rows, dweight, dbias, then programs and N
            part = _host_launch(part_entry, _pointers(needs.dweight, needs.dbias, needs.dweight, needs.dbias) + "ii")
        free = next((slot for slot in self.native.variants if slot.key == -1), None)
        if bwd is None or (part_entry is not None and part is None) or free is None:
            return
        free.bwd = bwd
        if part is not None:
            free.part = part
        free.key = _variant_index(variant)

    def _launches(self, variant: tuple, m: int, dy_stride: int, progs: int, needs: GradsNeeded, pdl: bool,
                  groups_fastest: bool) -> tuple | None:
        """(bwd_kernel's :func:`_ready` launch, sum_partials_kernel's or None) of this variant, from the launchers
        :func:`_launch` cached (None: one is not compiled yet); remembered in ``variants``."""
        x_dt, z_dt, w_dt, b_dt = self.dtypes
        f32 = torch.float32
        n = self.n
        spec = _aligned_spec((x_dt, x_dt, z_dt, w_dt, b_dt, None if self.spec.is_rms_norm else f32, f32,
                              x_dt if needs.dx else None, z_dt if needs.dz else None, f32 if needs.dweight else None,
                              f32 if needs.dbias else None, m, dy_stride, self.x_stride, self.z_stride, n, n, n))
        constexprs = _bwd_kernel_constexprs(self.gs, self.block, self.rows, self.chunks, self.spec, self.has_z,
                                            self.has_bias, needs, pdl, groups_fastest)
        bwd = _COMPILED.get((bwd_kernel, self.index, self.warps, pdl, constexprs, spec))
        if bwd is None:
            return None
        part = None
        if needs.dweight or needs.dbias:
            block_p, block_n, sum_warps = self.partials
            part_spec = _aligned_spec((f32 if needs.dweight else None, f32 if needs.dbias else None,
                                       w_dt if needs.dweight else None, b_dt if needs.dbias else None, progs, n))
            part_constexprs = (block_p, block_n, needs.dweight, needs.dbias, _INTERPRET, pdl)
            part = _COMPILED.get((sum_partials_kernel, self.index, sum_warps, pdl, part_constexprs, part_spec))
            if part is None:
                return None
            part_entry = part
            part = _ready(part, (n, *part_constexprs))
        else:
            part_entry = None
        launches = (_ready(bwd, (self.x_stride, self.z_stride, n, n, n, *constexprs)), part)
        self.variants[variant] = launches
        self.entries[variant] = (bwd, part_entry, needs)
        if self.native is not None:
            self._register(variant, self.entries[variant])
        return launches

    def __call__(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor,
                 needs: GradsNeeded) -> Grads | None:
        # Written flat, as ForwardPlan.__call__ is (every backward of a repeated signature runs this); the C++
        # entry first, as there.
        backward = self.native_backward
        if backward is not None:
            done = backward(self.native_address, dy, x, weight, bias, z, mean, rstd, needs)
            if done is not None:
                return done
        elif self.native_wanted:
            self._attach()
        m, n = x.shape
        if m == 0 or m >= 2**31 or dy.dtype != x.dtype or dy.stride(-1) != 1:
            return None
        dy_stride = dy.stride(0)
        pdl = self.pdl if self.pdl is not None else (m * n < PDL_MAX_ELEMENTS and self.pdl_ok)
        progs = _bwd_programs(m, self.rows, self.groups, self.sms, self.per_sm)
        groups_fastest = self.groups_fastest_order and self.groups > 1 and progs <= MAX_GRID_Y
        variant = (m == 1, not m & 15, dy_stride == 1, not dy_stride & 15, -(2**31) <= dy_stride < 2**31,
                   progs == 1, not progs & 15, needs, pdl, groups_fastest)
        launches = self.variants.get(variant) or self._launches(variant, m, dy_stride, progs, needs, pdl,
                                                                groups_fastest)
        hooks = None if launches is None else _launch_hooks(self.index)
        if hooks is None:
            return None
        need_dx, need_dz, need_dw, need_db = needs
        contiguous = torch.contiguous_format
        dx = torch.empty_like(x, memory_format=contiguous) if need_dx else None
        dz = torch.empty_like(z, memory_format=contiguous) if need_dz else None
        alloc = self.alloc_partials
        dw_part = alloc((progs, n), dtype=torch.float32, device=self.device) if need_dw else None
        db_part = alloc((progs, n), dtype=torch.float32, device=self.device) if need_db else None
        dw = torch.empty_like(weight, memory_format=contiguous) if need_dw else None
        db = torch.empty_like(bias, memory_format=contiguous) if need_db else None
        tensors = (dy, x, z, weight, bias, mean, rstd, dx, dz, dw_part, db_part, dw, db)
        # the addresses, None for absent tensors (as the launcher's key has them); written out, not a generator
        ptrs = (dy.data_ptr(), x.data_ptr(), None if z is None else z.data_ptr(), weight.data_ptr(),
                None if bias is None else bias.data_ptr(), None if mean is None else mean.data_ptr(), rstd.data_ptr(),
                None if dx is None else dx.data_ptr(), None if dz is None else dz.data_ptr(),
                None if dw_part is None else dw_part.data_ptr(), None if db_part is None else db_part.data_ptr(),
                None if dw is None else dw.data_ptr(), None if db is None else db.data_ptr())
        aligned = 0
        for p in ptrs:
            if p is not None:
                aligned |= p
        if aligned & 15:
            return None
        global planned_backward_launches
        planned_backward_launches += 1
        bwd, part = launches
        grid0, grid1 = (self.groups, progs) if groups_fastest else (progs, self.groups)
        stream = torch._C._cuda_getCurrentRawStream(self.index)
        enter, leave = hooks
        _fire(bwd, grid0, grid1, stream, enter, leave, ptrs[:11], tensors[:11], (m, dy_stride))
        if part is not None:  # (dw_part, db_part, dw, db, programs, N), as backward launches it
            _fire(part, -(-n // self.partials[1]), 1, stream, enter, leave, ptrs[9:], tensors[9:], (progs,))
        return dx, dz, dw, db


def plan_forward_quant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                       spec: NormSpec, qspec: QuantSpec, rescue_kernel_min_elements: int | None = None,
                       rescue_scan_rows: int = RESCUE_SCAN_ROWS, pdl: bool | None = None,
                       fast: bool = True) -> QuantPlan | None:
    """A :class:`QuantPlan` for the signature of these tensors, or None where :func:`.launch.forward_quant` would
    not take the fused kernel through the cached launcher: a layout :func:`.launch.quant_layout` does not
    cover, and what :func:`plan_forward` refuses (other than the forward's program order)."""
    if not _rows_plannable(x, weight, bias, z, fast) or quant_layout(spec.group_size, qspec.block) is None:
        return None
    return QuantPlan(x, weight, bias, z, spec, qspec, rescue_kernel_min_elements, rescue_scan_rows, pdl)


#: Quantized forwards launched through a :class:`QuantPlan` (a diagnostic for benchmarks and tests).
planned_quant_launches = 0


class QuantPlan:
    """The fused quantized forward of one call signature (fwd_quant_kernel, and quant_rescue_kernel after it on
    calls of at least ``rescue_kernel_min_elements`` elements), decided once as :class:`ForwardPlan` decides the
    forward: the same compiled kernels, grids and arguments as :func:`.launch.forward_quant`
    (tests/test_gpu.py::test_quant_plan_matches_plain_launch).

    Called with tensors of the signature it returns ``(q (M, N), scale storage)``, both new, the storage (M, G)
    or, for column-major scales, (G, M) as ``ops._quant_outputs`` makes them; or None, having written nothing,
    where it does not serve the call (as :class:`ForwardPlan`). Where the plans' C++ entry is in use for it
    (:data:`.cxx_plans.ENABLED`), the call is made there (``cxx_plans.cpp``'s ``quant``) once its variant
    is registered.
    """

    __slots__ = ("n", "groups", "rows", "warps", "order", "tiles", "device", "index", "pdl", "pdl_ok", "rescue_pdl",
                 "rescue_min", "scan_rows", "column_major", "q_dtype", "fixed_args", "eps", "arg_dtypes", "constexprs",
                 "variants", "entries", "call_args", "native", "native_quant", "native_address", "native_wanted")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                 spec: NormSpec, qspec: QuantSpec, rescue_kernel_min_elements: int | None, rescue_scan_rows: int,
                 pdl: bool | None) -> None:
        n = x.shape[-1]
        layout = quant_layout(spec.group_size, qspec.block)
        self.n, self.groups = n, n // qspec.block
        self.rows, self.warps, self.order = _quant_config(spec.group_size, qspec.block)
        self.tiles = n // (layout[0] * spec.group_size)
        self.device = x.device
        self.index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        self.pdl, self.pdl_ok = pdl, pdl_supported(x.device)
        self.rescue_pdl = rescue_scan_pdl(pdl, x.device)  # the scan after a large forward, as the backend launches it
        self.rescue_min = quant_rescue_scan_min_elements(rescue_kernel_min_elements, spec, qspec)
        self.scan_rows = rescue_scan_rows
        self.column_major = qspec.column_major_scales
        self.q_dtype = quant_dtype(qspec.quant)
        by_bits = _fp8_by_bits(x.device, qspec.quant == "fp8_e4m3fnuz")
        kernel_q_dtype = torch.uint8 if by_bits and qspec.quant != "int8" else self.q_dtype
        row_stride = x.stride(0) if x.dim() == 2 else n
        z_stride = 0 if z is None else (z.stride(0) if z.dim() == 2 else n)
        # the runtime arguments after the tensors and m: x, z and q's row strides (then the scales' per call, and
        # eps: forward_quant's order)
        self.fixed_args = (row_stride, z_stride, n)
        self.eps = spec.eps
        self.arg_dtypes = (x.dtype, None if z is None else z.dtype, weight.dtype, None if bias is None else bias.dtype,
                           kernel_q_dtype, torch.float32)
        #: (USE_PDL, GROUPS_FASTEST, rescue after) -> (fwd_quant_kernel's constexprs, quant_rescue_kernel's or
        #: None), in order
        self.constexprs = {}
        for p in (False, True):
            shared = _quant_kernel_constexprs(spec, qspec, layout, z is not None, bias is not None, by_bits, p)
            for groups_fastest in (False, True):
                for after in (False, True):
                    fwd = dict(shared, ROWS=self.rows, RESCUE_IN_KERNEL=not after, GROUPS_FASTEST=groups_fastest)
                    rescue = dict(shared, SCAN=rescue_scan_rows, USE_PDL=self.rescue_pdl)
                    self.constexprs[(p, groups_fastest, after)] = (
                        tuple(fwd[name] for name in fwd_quant_kernel.arg_names[13:]),
                        tuple(rescue[name] for name in quant_rescue_kernel.arg_names[13:]) if after else None)
        #: (M == 1, M % 16 == 0, USE_PDL, GROUPS_FASTEST, rescue after) -> the launches, see _variant_launches
        self.variants: dict[tuple[bool, ...], tuple] = {}
        #: the same variants -> the launchers' cache entries (fwd_quant_kernel's, quant_rescue_kernel's or None)
        self.entries: dict[tuple[bool, ...], tuple] = {}
        # the runtime arguments' classes in forward_quant's order (x, z, weight, bias, q, scales, m, three row
        # strides, the scales' two strides, eps), as _host_launch checks a signature against them
        self.call_args = _pointers(True, z is not None, True, bias is not None, True, True) + "i" * 6 + "f"
        # the C++ entry (cxx_plans.cpp), as ForwardPlan's
        self.native_quant = None
        _start_native(self, cxx_plans.ENABLED)

    def _attach(self) -> None:
        """Hand this plan's decisions to the C++ entry once its extension is loaded (as ForwardPlan._attach)."""
        module = _extension_for(self)
        if module is None:
            return
        state = _QuantPlanState(
            n=self.n, groups=self.groups, rows=self.rows, tiles=self.tiles, scan_rows=self.scan_rows,
            rescue_min=self.rescue_min, pdl_max_elements=PDL_MAX_ELEMENTS, max_grid_y=MAX_GRID_Y,
            pdl_mode=-1 if self.pdl is None else int(self.pdl), pdl_ok=int(self.pdl_ok),
            groups_fastest_order=int(self.order == ORDER_GROUPS_FASTEST), column_major=int(self.column_major),
            device_index=self.index, on_cuda=int(self.device.type == "cuda"), eps=self.eps)
        state.fixed[:] = self.fixed_args
        self.native = state
        for variant, entries in self.entries.items():
            _register(state, variant, entries, self.call_args)
        self.native_quant, self.native_address = module.quant, ctypes.addressof(state)

    def _scale_strides(self, m: int) -> tuple[int, int]:
        """The (M, G) scale tensor's strides over its storage (see ``ops._scale_view``)."""
        return (1, m) if self.column_major else (self.groups, 1)

    def _launches(self, variant: tuple[bool, ...], m: int) -> tuple | None:
        """The launches of this variant (None: a kernel is not compiled yet)."""
        spec = _aligned_spec((*self.arg_dtypes, m, *self.fixed_args, *self._scale_strides(m), self.eps))
        return _variant_launches(self, variant, fwd_quant_kernel, quant_rescue_kernel, spec)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        quant = self.native_quant  # the C++ entry first, as ForwardPlan's call
        if quant is not None:
            done = quant(self.native_address, x, z, weight, bias, self.q_dtype)
            if done is not None:
                return done
        elif self.native_wanted:
            self._attach()
        n = self.n
        rows = _rows_and_pdl(x, n, self.pdl, self.pdl_ok)
        if rows is None:
            return None
        m, pdl = rows
        after = m * n >= self.rescue_min
        grid, groups_fastest = _quant_grid(m, self.rows, self.tiles, self.order)
        variant = (m == 1, not m & 15, pdl, groups_fastest, after)
        launches = self.variants.get(variant) or self._launches(variant, m)
        hooks = None if launches is None else _launch_hooks(self.index)
        if hooks is None:
            return None
        q = torch.empty((m, n), dtype=self.q_dtype, device=self.device)
        storage = torch.empty((self.groups, m) if self.column_major else (m, self.groups), dtype=torch.float32,
                              device=self.device)
        xp, wp, qp, sp = x.data_ptr(), weight.data_ptr(), q.data_ptr(), storage.data_ptr()
        zp = 0 if z is None else z.data_ptr()
        bp = 0 if bias is None else bias.data_ptr()
        if (xp | wp | qp | sp | zp | bp) & 15:
            return None
        global planned_quant_launches
        planned_quant_launches += 1
        stream = torch._C._cuda_getCurrentRawStream(self.index)
        enter, leave = hooks
        pointers = (xp, zp or None, wp, bp or None, qp, sp)
        tensors = (x, z, weight, bias, q, storage)
        head = (m, *self.fixed_args, *self._scale_strides(m), self.eps)
        fwd, rescue = launches
        _fire(fwd, grid[0], grid[1], stream, enter, leave, pointers, tensors, head)
        if rescue is not None:  # quant_rescue_kernel: the forward's arguments and warps, a program per SCAN rows
            _fire(rescue, -(-m // self.scan_rows), self.tiles, stream, enter, leave, pointers, tensors, head)
        return q, storage

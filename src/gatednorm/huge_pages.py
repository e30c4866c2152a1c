"""Large CPU outputs on transparent huge pages: the first write of a fresh output without a page fault per 4 KiB.

glibc serves a block of 32 MiB or more from a fresh ``mmap`` (smaller ones too, depending on its history),
so every 4 KiB page of a new output faults on its first write (the kernel traps, zeroes the page, maps it).
For the native backend's large outputs that cost more than the norm itself: filling a fresh 32 MiB tensor
took 10.0 ms, 2.5 ms when the memory was already mapped, and 2.6 ms after ``madvise(MADV_HUGEPAGE)`` (one
fault per 2 MiB page; 2-core Xeon VM, Linux 6.18, THP mode ``madvise``). So :func:`advise_huge_pages` asks
the kernel for huge pages on the forward outputs this package allocates itself (``gatednorm.ops``), before
their first write. Not on the backward's gradients: with them advised too, forward+backward with one core
busy ran 3.1-5.0x slower than quiet in three of five benchmark runs on the VM (1.6x without; a guess, not
measured: huge pages that the VM had reported free to its host and must fault in again there).

What it touches: only the whole 2 MiB-aligned stretches inside the tensor's own bytes (never a
neighbour's), only for tensors of :data:`MIN_BYTES` or more, which are written whole, and only where
that memory is not in use yet (``mincore``: a block the allocator hands out again keeps its pages, and
the advice is then skipped, as it would only cost time). The populate step (``MADV_POPULATE_WRITE``,
Linux 5.14+) maps the pages in one system call before the kernel's threads write them: without it the
times spread (4096x4096 bf16 gated RMSNorm forward, two threads: median 23.6 ms, 16.6 ms with it, 18.1
with 4 KiB pages; our reading, not measured: two threads faulting on one fresh 2 MiB page wait for each other). What it
changes: the kernel's choice of page size for those bytes, nothing else; without transparent huge pages
(THP mode ``never``, another OS, no libc) it is a no-op. The cost it can have: with THP "defrag" set to
``madvise`` or ``always``, a fault may compact memory to find a free 2 MiB page on a fragmented machine.
``GATEDNORM_HUGE_PAGES=0`` turns it off (read on every call, as every setting). PyTorch offers the same
for every allocation of a process: ``THP_MEM_ALLOC_ENABLE=1`` (then this is redundant, and harmless).
"""

from __future__ import annotations

import ctypes
import sys

import torch

from .settings import env_text

__all__ = ["MIN_BYTES", "advise_huge_pages", "advised_fresh", "status"]

#: Outputs smaller than this keep the allocator's pages. glibc serves a block of 32 MiB or more from a new
#: ``mmap`` every time (its mmap threshold grows to 32 MiB at most), so such outputs always pay the faults;
#: smaller ones come as often from the heap, reused, and there the advice measured a loss as often as a
#: gain (a block at the top of the heap that glibc trimmed and grew again; why, not measured: perhaps huge
#: pages drawn from memory the virtual machine had reported free to its host).
MIN_BYTES = 32 << 20

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux's values on every architecture (asm-generic/mman-common.h)
_MADV_POPULATE_WRITE = 23
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

#: libc's madvise and mincore once looked up; False where there are none (not Linux, no libc).
_madvise: object = None
_mincore: object = None


def _libc_madvise():
    global _madvise, _mincore
    if _madvise is None:
        _madvise = _mincore = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                madvise, mincore = libc.madvise, libc.mincore
            except (OSError, AttributeError):
                return _madvise
            madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            madvise.restype = ctypes.c_int
            mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
            mincore.restype = ctypes.c_int
            _madvise, _mincore = madvise, mincore
    return _madvise


def _fresh(first: int, end: int) -> bool:
    """Whether [first, end) looks freshly mapped: its first or its last 4 KiB page is not in memory yet.

    A block that glibc hands out again from its heap is in memory already (writing it costs no fault, and the
    advice would only cost time); a new ``mmap`` (or heap grown by ``brk``) is not. Where ``mincore`` fails,
    the memory counts as fresh.
    """
    flags = ctypes.create_string_buffer(1)
    for page in (first, end - 4096):
        if _mincore(page, 4096, flags) != 0 or not flags.raw[0] & 1:
            return True
    return False


def _enabled() -> bool:
    return env_text("GATEDNORM_HUGE_PAGES") != "0"


def advise_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """``t``, its memory advised to be backed by 2 MiB pages. Call it on a fresh output before its first write.

    A CPU tensor of at least :data:`MIN_BYTES` only; others are returned untouched. The advice covers the
    whole 2 MiB-aligned stretches of ``t``'s bytes. A refusal by the kernel (THP off, an old kernel) is
    ignored: the tensor works as before, on 4 KiB pages.
    """
    advised_fresh(t)
    return t


def advised_fresh(t: torch.Tensor) -> bool:
    """:func:`advise_huge_pages` on ``t``; True when it advised, i.e. ``t`` is a CPU tensor of at least
    :data:`MIN_BYTES` whose memory was not mapped yet (its first write would have taken a page fault per 4 KiB)."""
    if not t.is_cpu:  # first: on a GPU this check is the whole cost of the call
        return False
    nbytes = t.numel() * t.element_size()
    if nbytes < MIN_BYTES or not _enabled():
        return False
    madvise = _libc_madvise()
    if madvise:
        start = t.data_ptr()
        first = (start + _HUGE_PAGE - 1) & -_HUGE_PAGE
        end = (start + nbytes) & -_HUGE_PAGE
        if end > first and _fresh(first, end):
            madvise(first, end - first, _MADV_HUGEPAGE)
            madvise(first, end - first, _MADV_POPULATE_WRITE)
            return True
    return False


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word of the sysfs file), None where unknown."""
    try:
        with open(_THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def status() -> str:
    """One line for ``gatednorm info``: whether large CPU outputs get huge pages, and why not."""
    if not _enabled():
        return "off (GATEDNORM_HUGE_PAGES=0)"
    if not _libc_madvise():
        return "not available (no Linux madvise)"
    mode = _thp_mode()
    if mode is None:
        return "asked for, on outputs >= 32 MiB (transparent huge pages: mode unknown)"
    if mode == "never":
        return "no effect: transparent huge pages are off (mode 'never')"
    return f"on for fresh CPU outputs >= 32 MiB (transparent huge pages: mode '{mode}')"

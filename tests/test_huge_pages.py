"""Large CPU outputs on huge pages (:mod:`gatednorm.huge_pages`): which bytes are advised, and when not at all.

The advice changes page sizes, never values, so these tests record the ``madvise`` calls (a stand-in
for libc's) and check their ranges: 2 MiB-aligned, inside the tensor's own bytes, covering every whole
2 MiB stretch of it; nothing for small tensors, non-CPU tensors, memory already in use (a stand-in for
``mincore``) or ``GATEDNORM_HUGE_PAGES=0``. Two
tests run the real advice where the kernel offers it: the outputs of both passes are advised and equal
to the same call without it, bit for bit. No timing is asserted (benchmarks/bench_cpu.py measures it).
"""

from __future__ import annotations

import ctypes
import mmap

import pytest
import torch
from helpers import make_inputs

import gatednorm
from gatednorm import huge_pages, ops
from gatednorm.backends.base import GradsNeeded
from gatednorm.spec import NormSpec

HUGE = 2 << 20


class RecordedMadvise:
    """Stands for libc's madvise: records (start, length, advice), returns 0 (success)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, start: int, length: int, advice: int) -> int:
        self.calls.append((start, length, advice))
        return 0

    def ranges(self) -> set[tuple[int, int]]:
        return {(start, length) for start, length, _ in self.calls}


class FakeMincore:
    """Stands for libc's mincore on one page: reports it in memory when its address is in ``resident``."""

    def __init__(self) -> None:
        self.resident: set[int] = set()

    def __call__(self, start: int, length: int, flags) -> int:
        flags[0] = b"\x01" if start in self.resident else b"\x00"
        return 0


@pytest.fixture
def mincore(monkeypatch) -> FakeMincore:
    fake = FakeMincore()
    monkeypatch.setattr(huge_pages, "_mincore", fake)
    return fake


@pytest.fixture
def madvise(monkeypatch, mincore) -> RecordedMadvise:
    recorder = RecordedMadvise()
    monkeypatch.setattr(huge_pages, "_madvise", recorder)
    monkeypatch.delenv("GATEDNORM_HUGE_PAGES", raising=False)
    return recorder


def whole_huge_pages(t: torch.Tensor) -> tuple[int, int]:
    """(first, end) of the 2 MiB-aligned stretch inside t's bytes, computed independently of the module."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = -(-start // HUGE) * HUGE
    return first, end // HUGE * HUGE


@pytest.mark.parametrize("offset_elements", [0, 1, 1000, HUGE // 4 + 3])
def test_advice_covers_the_whole_huge_pages_inside_the_tensor(madvise, offset_elements):
    size = huge_pages.MIN_BYTES // 4 + HUGE // 8  # float32 elements: MIN_BYTES and a half huge page
    base = torch.empty(size + HUGE, dtype=torch.float32)
    t = base[offset_elements:offset_elements + size]  # at varied alignments
    assert huge_pages.advise_huge_pages(t) is t
    first, end = whole_huge_pages(t)
    assert first % HUGE == 0 and end % HUGE == 0 and end - first >= huge_pages.MIN_BYTES - HUGE
    assert madvise.ranges() == {(first, end - first)}
    # both advices: huge pages, then mapped before the first write
    assert sorted(advice for _, _, advice in madvise.calls) == [14, 23]
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    assert all(lo <= start and start + length <= hi for start, length, _ in madvise.calls)


@pytest.mark.parametrize("resident_pages", [(), ("first",), ("last",), ("first", "last")])
def test_memory_already_in_use_is_left_alone(madvise, mincore, resident_pages):
    # a block glibc hands out again is in memory: no advice (it would only cost time); a fresh one is not
    t = torch.empty(huge_pages.MIN_BYTES // 4, dtype=torch.float32)
    first, end = whole_huge_pages(t)
    mincore.resident = {first if p == "first" else end - 4096 for p in resident_pages}
    huge_pages.advise_huge_pages(t)
    assert bool(madvise.calls) == (len(resident_pages) < 2)


@pytest.mark.skipif(huge_pages._libc_madvise() is False, reason="no Linux madvise here")
def test_fresh_memory_is_told_from_memory_in_use():
    # a mapping of our own: an allocator may hand a tensor memory it used before
    block = mmap.mmap(-1, 4 * HUGE)
    try:
        buffer = (ctypes.c_char * len(block)).from_buffer(block)
        start = ctypes.addressof(buffer)
        first, end = -(-start // HUGE) * HUGE, (start + len(block)) // HUGE * HUGE
        assert huge_pages._fresh(first, end)
        block[:] = b"\x01" * len(block)
        assert not huge_pages._fresh(first, end)
        del buffer
    finally:
        block.close()


@pytest.mark.parametrize("case", ["small", "meta", "switched off"])
def test_no_advice(madvise, monkeypatch, case):
    if case == "small":
        t = torch.empty(huge_pages.MIN_BYTES // 4 - 1, dtype=torch.float32)
    elif case == "meta":
        t = torch.empty(huge_pages.MIN_BYTES, dtype=torch.float32, device="meta")
    else:
        monkeypatch.setenv("GATEDNORM_HUGE_PAGES", "0")
        t = torch.empty(huge_pages.MIN_BYTES, dtype=torch.float32)
    assert huge_pages.advise_huge_pages(t) is t
    assert madvise.calls == []
    assert huge_pages.status().startswith("off") == (case == "switched off")


def test_the_smallest_advised_size(madvise):
    t = torch.empty(huge_pages.MIN_BYTES // 2, dtype=torch.bfloat16)
    huge_pages.advise_huge_pages(t)
    first, end = whole_huge_pages(t)
    assert madvise.ranges() == ({(first, end - first)} if end > first else set())


def test_without_madvise_nothing_is_called(monkeypatch):
    monkeypatch.setattr(huge_pages, "_madvise", False)
    monkeypatch.setattr(huge_pages, "_mincore", False)
    monkeypatch.delenv("GATEDNORM_HUGE_PAGES", raising=False)
    t = torch.empty(huge_pages.MIN_BYTES, dtype=torch.float32)
    assert huge_pages.advise_huge_pages(t) is t
    assert huge_pages.status() == "not available (no Linux madvise)"


def _advised_outputs(madvise: RecordedMadvise, outputs) -> set[int]:
    """The outputs whose whole huge pages were advised (their indices)."""
    advised = set()
    for i, t in enumerate(outputs):
        first, end = whole_huge_pages(t)
        if (first, end - first) in madvise.ranges():
            advised.add(i)
    return advised


def test_the_forward_output_is_advised_and_the_gradients_are_not(madvise):
    # 4096 x 4096 bf16 = 32 MiB per tensor. Gradients keep 4 KiB pages: with huge pages for them too, the
    # two-core VM's forward+backward with one core busy ran 3.1-5.0x slower than quiet in three of five
    # benchmark runs (1.6x without), while the forward alone gained.
    x, z, weight, _ = make_inputs(4096, 4096, torch.bfloat16, bias=False)
    spec = NormSpec(1e-6, 128, True, True, "swish")
    backend = ops.select_impl("native", x.device)
    out = ops._new_rows(x)
    mean, rstd = backend.forward(x, weight, None, z, spec, out)
    dy = torch.randn_like(x)
    dx, dz, _, _ = backend.backward(dy, x, weight, None, z, mean, rstd, spec, GradsNeeded(True, True, True, False))
    assert _advised_outputs(madvise, [out, dx, dz, x, z, dy]) == {0}


@pytest.mark.skipif(huge_pages._libc_madvise() is False, reason="no Linux madvise here")
def test_real_advice_leaves_the_bits_alone(monkeypatch):
    x, z, weight, _ = make_inputs(8192, 1024, torch.float32, bias=False)  # 32 MiB
    x.requires_grad_(True)
    z.requires_grad_(True)
    dy = torch.randn_like(x)

    def run():
        y = gatednorm.rmsnorm_fn(x, weight, None, z=z, group_size=128, backend="native")
        gx, gz = torch.autograd.grad(y, (x, z), dy)
        return y.detach(), gx, gz

    monkeypatch.setenv("GATEDNORM_HUGE_PAGES", "0")
    plain = run()
    monkeypatch.setenv("GATEDNORM_HUGE_PAGES", "1")
    advised = run()
    for a, b in zip(plain, advised, strict=True):
        assert torch.equal(a, b)

"""The case matrix of ``gatednorm verify``: what runs, in which order, in which worker, on which data.

A case is one (backend, :class:`Shape`, :class:`Variant`). The variants are the product of
LayerNorm/RMSNorm x gate none/after/before x swish/sigmoid x bias x groups x dtype; the shapes
come in a quick set (CI) and a full set (sizes of real models). :func:`case_order` puts the cases
in breadth-first order, :func:`shard_jobs` deals them out to ``--jobs`` workers, and
:func:`make_inputs` draws each case's data from its own seed (:func:`case_seed`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

#: Output dtypes by the name used on the command line and in the report.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
GATES = ("none", "after", "before")
ACTIVATIONS = ("swish", "sigmoid")
#: The epsilon of every case.
EPS = 1e-6


@dataclass(frozen=True)
class Shape:
    """x is (*lead, n); ``group_size`` is the grouped variant's group size (None: only one group)."""

    name: str
    lead: tuple[int, ...]
    n: int
    group_size: int | None

    @property
    def rows(self) -> int:
        return math.prod(self.lead)


QUICK_SHAPES = (
    Shape("33x256/g64", (33,), 256, 64),
    Shape("2x4x96/g32", (2, 4), 96, 32),
    Shape("8x1920/g640", (8,), 1920, 640),  # group size not a power of two (padded lanes)
)

FULL_SHAPES = (
    Shape("heads 64x16x128", (64, 16), 128, None),  # one 128-wide head per row (gated delta net)
    Shape("hidden 256x4096/g128", (256,), 4096, 128),
    Shape("mamba2 128x5120/g640", (128,), 5120, 640),
    Shape("wide 32x8192", (32,), 8192, 1024),
    Shape("odd 100x1000/g200", (100,), 1000, 200),
    # 96 = 3 x 32: on GPUs the triton kernels read such a group as three unpadded tiles (launch.fwd_parts)
    Shape("three-part 64x3072/g96", (64,), 3072, 96),
)


@dataclass(frozen=True)
class Variant:
    """One combination of the operator's options and the dtype of its inputs and output."""

    is_rms_norm: bool
    gate: str  # none | after | before
    activation: str  # swish | sigmoid (irrelevant without gate)
    has_bias: bool
    grouped: bool
    dtype: str

    @property
    def norm_before_gate(self) -> bool:
        return self.gate != "before"

    def label(self) -> str:
        """A short, unique, human-readable name (also part of the case's seed)."""
        parts = ["rms" if self.is_rms_norm else "ln", f"gate={self.gate}"]
        if self.gate != "none":
            parts.append(self.activation)
        parts += ["bias" if self.has_bias else "nobias", "groups" if self.grouped else "1group", self.dtype]
        return " ".join(parts)


#: One case: (backend, shape, variant). A quantized case (gatednorm.verify.quantized) is (backend, QuantShape,
#: QuantVariant): QuantShape is a Shape; QuantVariant has the ``label()`` and ``dtype`` the runner needs.
Case = tuple[str, Shape, Variant]


def variants(dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> Iterator[Variant]:
    """Every variant for ``dtypes`` (the activation only varies where there is a gate)."""
    for dtype in dtypes:
        for rms in (False, True):
            for gate in GATES:
                for act in (ACTIVATIONS if gate != "none" else ("swish",)):
                    for has_bias in (True, False):
                        for grouped in (False, True):
                            yield Variant(rms, gate, act, has_bias, grouped, dtype)


def case_applies(shape: Shape, variant: Variant) -> bool:
    """The grouped variant only runs on shapes with more than one group."""
    return not variant.grouped or (shape.group_size is not None and shape.group_size != shape.n)


def breadth_first(items: Sequence, keys: Sequence[Callable[[object], Hashable]]) -> list:
    """Reorder ``items`` so that every prefix covers the values of the keys as evenly as possible.

    Greedy: the next item is the one whose key values have been taken least often so far (the sum
    over keys of how often its value was taken), ties broken by how often its pairs of key values
    were taken, then by input order. A run cut short thus has seen every backend, dtype, shape,
    norm kind, gate ... (and most of their pairs) before it repeats any. Deterministic.
    """
    n, k = len(items), len(keys)
    if n <= 1 or not keys:
        return list(items)
    values: list[dict[Hashable, int]] = [{} for _ in keys]
    pts = torch.tensor([[values[j].setdefault(key(it), len(values[j])) for j, key in enumerate(keys)]
                        for it in items], dtype=torch.int64)
    sizes = [len(v) for v in values]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    pair_idx = [pts[:, i] * sizes[j] + pts[:, j] for i, j in pairs]
    single = [torch.zeros(d, dtype=torch.int64) for d in sizes]
    double = [torch.zeros(sizes[i] * sizes[j], dtype=torch.int64) for i, j in pairs]
    big = n * len(pairs) + 1  # a single count outweighs any sum of pair counts
    taken = torch.zeros(n, dtype=torch.bool)
    order = []
    for _ in range(n):
        score = sum(single[j][pts[:, j]] for j in range(k)) * big + sum(c[p] for c, p in zip(double, pair_idx,
                                                                                               strict=True))
        score[taken] = torch.iinfo(torch.int64).max
        i = int(torch.argmin(score))  # the first minimum: ties keep input order
        taken[i] = True
        order.append(i)
        for j in range(k):
            single[j][pts[i, j]] += 1
        for c, p in zip(double, pair_idx, strict=True):
            c[p[i]] += 1
    return [items[i] for i in order]


def case_order(backends: Sequence[str], shapes: Sequence[Shape], variants_: Sequence[Variant]) -> list[Case]:
    """Every applicable (backend, shape, variant), ordered breadth first (see :func:`breadth_first`).

    A run stopped early (``--max-seconds``, SIGTERM) then has covered every backend, dtype and
    shape, the norm kinds and gates, before it repeats any of them; the full set is the same as
    the plain product.
    """
    jobs = [(b, s, v) for b in backends for s in shapes for v in variants_ if case_applies(s, v)]
    return breadth_first(jobs, [
        lambda j: j[0],  # backend
        lambda j: j[2].dtype,
        lambda j: j[1].name,  # shape
        lambda j: (j[2].is_rms_norm, j[2].gate),
        lambda j: j[2].grouped,
        lambda j: j[2].has_bias,
        lambda j: j[2].activation,
    ])


def interleave(first: Sequence, second: Sequence) -> list:
    """``first`` and ``second`` merged so that every prefix holds them in proportion, each in its own order.

    How ``verify`` puts the quantized cases among the norm's: a run cut short has run both kinds, in
    the shares of the whole run. Element i of a list of n sits at (i + 1/2) / n of the way; ties go to
    ``first``. Deterministic.
    """
    n, m = len(first), len(second)
    out, i, j = [], 0, 0
    while i < n or j < m:
        if j < m and (i == n or (2 * j + 1) * n < (2 * i + 1) * m):
            out.append(second[j])
            j += 1
        else:
            out.append(first[i])
            i += 1
    return out


def shard_jobs(jobs: Sequence[Case], shard: int, shards: int) -> list[Case]:
    """The jobs of worker ``shard`` of ``shards`` (``verify --jobs``), in their original order.

    Every backend's job for one (shape, variant) goes to the same worker: on a GPU the first use of
    a kernel variant JIT-compiles, and the upstream comparison runs for each backend, so one process
    compiling a variant once beats several compiling it side by side. Groups are dealt out largest
    first to the least loaded worker (cost ~ elements + a fixed per-case overhead); deterministic, so
    workers and the parent agree on the split without talking.
    """
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, shards) with shards >= 1, got shard={shard}, shards={shards}")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (_, s, v) in enumerate(jobs):
        groups.setdefault((s.name, v.label()), []).append(i)
    overhead = 1 << 16

    def cost(idx: list[int]) -> int:
        s = jobs[idx[0]][1]
        return len(idx) * (s.rows * s.n + overhead)

    load = [0] * shards
    mine: list[int] = []
    for key in sorted(groups, key=lambda k: (-cost(groups[k]), k)):
        w = min(range(shards), key=lambda j: (load[j], j))
        load[w] += cost(groups[key])
        if w == shard:
            mine.extend(groups[key])
    return [jobs[i] for i in sorted(mine)]


def case_seed(seed: int, shape: Shape, variant: Variant) -> int:
    """The data seed of one case: independent of the order (and subset) of cases run, so a partial
    run draws the same inputs as a full one, and every backend sees the same data for a case."""
    return (seed * 1_000_003 + zlib.crc32(f"{shape.name}|{variant.label()}".encode())) % (2**63)


@dataclass
class Inputs:
    """The tensors of one case, on the device under test, in the variant's dtype."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    z: torch.Tensor | None
    dy: torch.Tensor
    group_size: int
    variant: Variant = field(repr=False)


def make_inputs(shape: Shape, variant: Variant, device: torch.device, gen: torch.Generator) -> Inputs:
    """Fresh random data (drawn on CPU for reproducibility across devices), rows with a mean offset."""
    dtype = DTYPES[variant.dtype]
    full = (*shape.lead, shape.n)

    def rnd(*size, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*size, generator=gen, dtype=torch.float64)).to(device, dtype)

    x = rnd(*full, scale=1.5, shift=0.3)
    z = rnd(*full, scale=2.0) if variant.gate != "none" else None
    weight = rnd(shape.n, scale=0.2, shift=1.0)
    bias = rnd(shape.n, scale=0.2) if variant.has_bias else None
    dy = rnd(*full)
    gs = shape.group_size if (variant.grouped and shape.group_size) else shape.n
    return Inputs(x, weight, bias, z, dy, gs, variant)

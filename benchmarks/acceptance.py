"""The GPU goals of issues 16 and 14, checked against one benchmark run's JSON: every goal, every shape it
applies to, the figure measured, the bound and whether it is met, so that a closing note quotes each goal as
measured and forgets none.

    python benchmarks/acceptance.py --bench OUT/gpu_bench.json [--quant OUT/quant_bench.json] [--markdown PATH]

``--bench``: what ``benchmarks/bench_gpu.py [--host]`` wrote (issue 16); ``--quant``: what ``bench_gpu.py --quant``
wrote (issue 14). Reads the JSON only (no torch, no GPU): it runs on the machine the results were copied to.
A goal whose figure the run did not measure (a peer not installed, a shape left out, no CUDA-graph time) is
listed as "not measured", never as met. Correctness goals (``tests/test_gpu.py``, ``gatednorm verify --device
cuda``) are not in these files; their results are quoted from their own logs.

The bounds are the issues' own:

* issue 16: the forward at least as fast as the best of sglang, fla's layernorm_gated and fla's fused_norm_gate
  on every shape (eager do_bench medians, L2 flushed, one run); forward >= 90% and forward+backward >= 75% of the
  copy bandwidth measured in the same run on every shape of at least 32M elements (forward+backward eagerly and
  in a CUDA graph); host time per call (back to back) forward <= 2x one torch.mul, forward+backward <= 1.5x the
  autograd pair ``(x * z).backward(dy)``; in a CUDA graph forward <= 1.3x one torch.mul at 8192x128 and
  2048x128, forward+backward <= 5x;
* issue 14: the fused quantized forward >= 1.8x faster than the norm followed by each separate quantization the
  run timed, and >= 85% of copy, on shapes of at least 32M elements; in a CUDA graph at 8192x128 within 1.3x of
  one torch.mul.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from typing import NamedTuple

#: The issues' threshold: bandwidth goals apply to shapes of at least this many elements.
BIG = 32 * 1024 * 1024
OURS = "gatednorm triton"
#: bench_gpu.py's serving forward (small shapes, since session 32): the statistics discarded, the output-only tile.
OURS_SERVING = "gatednorm triton, statistics discarded"
FUSED = "fused (gated_norm_quant)"
#: bench_gpu.py's names of the peers of issue 16's forward goal (sglang's carries its version: a prefix).
PEERS = ("sglang", "fla layernorm_gated", "fla fused_norm_gate")
#: The shapes of issue 16's CUDA-graph forward goal and issue 14's (name prefixes).
GRAPH_FORWARD_SHAPES = ("8192x128 ", "2048x128 ")
QUANT_GRAPH_SHAPE = "8192x128 "


class Check(NamedTuple):
    """One goal on one case: the figure measured (None: not measured) against its bound."""

    issue: int
    goal: str
    case: str
    value: float | None
    bound: float
    at_least: bool  # True: value >= bound meets the goal; False: value <= bound
    unit: str
    detail: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        return "met" if (self.value >= self.bound if self.at_least else self.value <= self.bound) else "MISSED"

    def figure(self) -> str:
        """The value as the table prints it: 2 decimals for ratios, 1 for percentages, more where that rounding
        would read as the bound itself (a near tie, 1.0012x against <= 1x, would print "1.00x ... MISSED")."""
        if self.value is None:
            return "-"
        digits = 2 if self.unit == "x" else 1
        if f"{self.value:.{digits}f}" == f"{self.bound:.{digits}f}" and self.value != self.bound:
            digits += 2
        return f"{self.value:.{digits}f}{self.unit}"


def _big(rec: dict) -> bool:
    return rec["M"] * rec["N"] >= BIG


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} us"


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


#: A side-by-side ratio within this of 1 is a near tie: its note gives the range of the rounds' ratios too.
NEAR_TIE = 0.01
#: Where the benchmarks keep each round of a figure timed side by side with the others (bench_gpu's forwards and
#: small-shape graphs since session 23, bench_quant's eager figures since session 24).
_ROUNDS = {"ms": "rounds_ms", "graph_ms": "graph_rounds_ms"}


def _side_by_side(num: dict, den: dict, field: str) -> tuple[float | None, str]:
    """num's ``field`` over den's, and how it was read: the median of the rounds' ratios where the benchmark timed
    both side by side in rounds (a shared machine drifts alike within a round), else (older files) the ratio of
    the two figures."""
    num_rounds, den_rounds = num.get(_ROUNDS[field]), den.get(_ROUNDS[field])
    if num_rounds and den_rounds and len(num_rounds) == len(den_rounds):
        ratios = [a / b for a, b in zip(num_rounds, den_rounds, strict=True)]
        median = statistics.median(ratios)
        # a near tie also says whether every round fell the same way (a steady gap) or the rounds straddle 1
        spread = (f"; rounds {min(ratios):.4f}-{max(ratios):.4f}x" if abs(median - 1.0) < NEAR_TIE else "")
        return median, f" (median of {len(num_rounds)} rounds side by side{spread})"
    return _ratio(num.get(field), den.get(field)), ""


def _parity(shape: str, ours: dict, peers: dict[str, dict], field: str, where: str) -> Check:
    """Our forward's time (``field`` of the records) over the fastest peer's (issue 16: at most 1), read as
    :func:`_side_by_side` reads it."""
    goal = f"forward at least as fast as the best peer{where} (time / best peer's)"
    timed = {name: r for name, r in peers.items() if r.get(field)}
    if not timed:
        return Check(16, goal, shape, None, 1.0, False, "x", "no peer timed")
    best = min(timed, key=lambda name: timed[name][field])
    ratio, how = _side_by_side(ours, timed[best], field)
    return Check(16, goal, shape, ratio, 1.0, False, "x", f"best: {best}{how}")


def forward_checks(records: list[dict]) -> Iterator[Check]:
    """Issue 16's goals from bench_gpu.py's records."""
    for rec in records:
        shape = rec["shape"]
        fwd = rec.get("fwd", {})
        fb = rec.get("fwd_bwd", {})
        ours = fwd.get(OURS, {})
        peers = {name: r for name, r in fwd.items() if name.startswith(PEERS)}
        yield _parity(shape, ours, peers, "ms", "")
        if ours.get("graph_ms") and any(r.get("graph_ms") for r in peers.values()):
            # small shapes: the kernels alone (eagerly the host's time counts)
            yield _parity(shape, ours, peers, "graph_ms", ", in a CUDA graph")
        if _big(rec):
            yield Check(16, "forward >= 90% of copy", shape, ours.get("pct_copy"), 90.0, True, "%")
            ours_fb = fb.get(OURS, {})
            yield Check(16, "forward+backward >= 75% of copy, eagerly", shape, ours_fb.get("pct_copy"), 75.0, True, "%")
            yield Check(16, "forward+backward >= 75% of copy, in a CUDA graph", shape,
                        ours_fb.get("graph_pct_copy"), 75.0, True, "%")
        # back-to-back host time (the shapes below BIG): the median of the per-round ratios where bench_gpu timed
        # ours and the reference side by side (host_rounds), else (older files) the ratio of the two figures
        side_by_side = " (medians; ratio: median of rounds side by side)"
        if rec.get("mul_b2b_us"):
            ratio = rec.get("host_fwd_x_mul") or _ratio(ours.get("b2b_us"), rec["mul_b2b_us"])
            # torch.mul(x, z) (allocating, as issue 16's table names it) since session 23; files before that timed
            # it into a given out= (no allocation), which their notes say
            out_note = (f"; {rec['host_fwd_x_mul_out']:.2f}x torch.mul into out= ({_us(rec['mul_out_b2b_us'])})"
                        if rec.get("host_fwd_x_mul_out") else "")
            yield Check(16, "host: forward <= 2x one torch.mul per call", shape, ratio, 2.0, False, "x",
                        f"{_us(ours.get('b2b_us'))} / {_us(rec['mul_b2b_us'])}"
                        + (side_by_side if rec.get("host_fwd_x_mul") else "") + out_note)
        if rec.get("autograd_pair_b2b_us"):
            ours_fb_us = fb.get(OURS, {}).get("b2b_us")
            ratio = rec.get("host_fwd_bwd_x_pair") or _ratio(ours_fb_us, rec["autograd_pair_b2b_us"])
            yield Check(16, "host: forward+backward <= 1.5x the autograd pair per call", shape, ratio, 1.5, False,
                        "x", f"{_us(ours_fb_us)} / {_us(rec['autograd_pair_b2b_us'])}"
                        + (side_by_side if rec.get("host_fwd_bwd_x_pair") else ""))
        if shape.startswith(GRAPH_FORWARD_SHAPES):
            # the goal is the serving call's (a decode step in a graph discards the statistics); runs since
            # session 32 time it beside layer_norm_fwd (statistics kept, the training tile), and both are listed
            if OURS_SERVING in fwd:
                yield Check(16, "CUDA graph: forward <= 1.3x one torch.mul (statistics discarded: the serving call)",
                            shape, fwd[OURS_SERVING].get("graph_x_mul"), 1.3, False, "x")
                kept = " (statistics kept: layer_norm_fwd)"
            else:
                kept = ""
            yield Check(16, "CUDA graph: forward <= 1.3x one torch.mul" + kept, shape, ours.get("graph_x_mul"), 1.3,
                        False, "x")
        if rec.get("mul_graph_ms") and not _big(rec):
            yield Check(16, "CUDA graph: forward+backward <= 5x one torch.mul", shape,
                        fb.get(OURS, {}).get("graph_x_mul"), 5.0, False, "x")


def quant_checks(records: list[dict]) -> Iterator[Check]:
    """Issue 14's goals from bench_gpu.py --quant's records (one per shape and format)."""
    for rec in records:
        case = f"{rec['shape']} {rec['quant']} {rec['scale_format']}"
        impls = rec.get("impls", {})
        fused = impls.get(FUSED, {})
        if _big(rec):
            separate = {name: r for name, r in impls.items() if name.startswith("norm + ")}
            for name, r in separate.items():
                ratio, how = _side_by_side(r, fused, "ms")
                yield Check(14, "fused >= 1.8x faster than norm + separate quant", case, ratio, 1.8, True, "x",
                            name + how)
            if not separate:
                yield Check(14, "fused >= 1.8x faster than norm + separate quant", case, None, 1.8, True, "x")
            yield Check(14, "fused >= 85% of copy, eagerly", case, fused.get("pct_copy"), 85.0, True, "%")
            yield Check(14, "fused >= 85% of copy, in a CUDA graph", case, fused.get("graph_pct_copy"), 85.0, True,
                        "%")
        if rec["shape"].startswith(QUANT_GRAPH_SHAPE):
            yield Check(14, "CUDA graph: fused within 1.3x one torch.mul", case, fused.get("graph_x_mul"), 1.3, False,
                        "x")


def markdown(checks: list[Check], sources: list[str]) -> str:
    lines = [f"Goals checked against {', '.join(sources)}.", "",
             "| issue | goal | case | measured | bound | verdict | note |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        bound = f"{'>=' if c.at_least else '<='} {c.bound:g}{c.unit}"
        lines.append(f"| {c.issue} | {c.goal} | {c.case} | {c.figure()} | {bound} | {c.verdict} | {c.detail} |")
    counts = {v: sum(c.verdict == v for c in checks) for v in ("met", "MISSED", "not measured")}
    lines += ["", f"{counts['met']} met, {counts['MISSED']} missed, {counts['not measured']} not measured "
              f"(of {len(checks)} checks)."]
    return "\n".join(lines)


def load(path: str) -> tuple[dict, list[dict]]:
    with open(path) as f:
        data = json.load(f)
    return data.get("meta", {}), data["records"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", help="gpu_bench.json from benchmarks/bench_gpu.py (issue 16)")
    ap.add_argument("--quant", help="quant_bench.json from benchmarks/bench_gpu.py --quant (issue 14)")
    ap.add_argument("--markdown", help="also write the table here")
    args = ap.parse_args(argv)
    if not args.bench and not args.quant:
        ap.error("give --bench and/or --quant")
    checks: list[Check] = []
    sources = []
    for path, make in ((args.bench, forward_checks), (args.quant, quant_checks)):
        if path:
            meta, records = load(path)
            copy = meta.get("copy_gbps")
            sources.append(f"`{path}` ({meta.get('device', '?')}"
                           + (f", copy {copy:.0f} GB/s in the same run)" if copy else ")"))
            checks.extend(make(records))
    text = markdown(checks, sources)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

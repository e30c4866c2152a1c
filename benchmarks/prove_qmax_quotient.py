"""Exhaustive proof of kernels._quotient_by_qmax: RN(amax / QMAX) from a constant reciprocal and one correction.

For QMAX in {448, 240, 127} (fp8_e4m3, fp8_e4m3fnuz, int8) and float32 amax >= 0, the kernel computes

    c = RN(1 / QMAX),  q0 = RN(amax * c),  e = RN(amax - q0 * QMAX) (an fma),  q = RN(e * c + q0) (an fma)

and the claim is q == RN(amax / QMAX) wherever that quotient is at least 2^-126 (the scales' floor), and
q <= 2^-126 where it is not. Every float32 amax is checked in the ranges where the exponent matters (every
value below 2^-99: subnormal quotients and residuals; the top binade up to the largest float32), and two whole
normal binades, [1, 2) and [2, 4): between those ranges every step scales exactly by a power of two with amax
(q0 and q are normal there, the residual e is exact, a multiple of 2^-149, so no rounding depends on the
exponent), so they stand for the rest.

The float32 steps are emulated in float64 exactly: amax * c is exact in float64 (24 + 24 bits), q0 * QMAX too,
amax - q0 * QMAX is exact (they share all but a few leading bits), and each is rounded to float32 once. The last
fma's sum is rounded to float64 first; wherever that lands within 2^-45 of a float32 midpoint (a double
rounding could decide it) it is redone in exact rational arithmetic. The reference RN(amax / QMAX) is float64
division rounded to float32: for these QMAX (an odd factor 7, 15 or 127) a quotient is either exact in float64
or at least 2^-30 relative away from every float32 midpoint, so that double rounding never decides.

    .venv/bin/python benchmarks/prove_qmax_quotient.py    # about a minute on 2 cores; exit 1 on any counterexample
"""

from __future__ import annotations

import sys
from fractions import Fraction

import numpy as np

F32, F64 = np.float32, np.float64
FLOOR = F32(2.0**-126)


def bits_of(v: float) -> int:
    return int(np.array(v, dtype=F32).view(np.uint32))


def round_to_float32(value: Fraction) -> np.float32:
    """The float32 nearest an exact rational, ties to even."""
    x = F32(float(value))
    best = None
    for cand in (np.nextafter(x, F32(-np.inf)), x, np.nextafter(x, F32(np.inf))):
        d = abs(Fraction(float(cand)) - value)
        if best is None or d < best[0] or (d == best[0] and int(np.array(cand).view(np.uint32)) & 1 == 0):
            best = (d, cand)
    return best[1]


def counterexamples(qmax: float, lo_bits: int, hi_bits: int, chunk: int = 1 << 23) -> tuple[int, int]:
    """(amax in the bit range [lo_bits, hi_bits) where the kernel's steps miss, values redone exactly)."""
    c = F32(F64(1.0) / qmax)
    cd = F64(c)
    wrong_total = redone = 0
    for start in range(lo_bits, hi_bits, chunk):
        amax = np.arange(start, min(start + chunk, hi_bits), dtype=np.uint32).view(F32)
        ad = amax.astype(F64)
        expect = (ad / qmax).astype(F32)
        q0 = (ad * cd).astype(F32)
        e = (ad - F64(q0) * qmax).astype(F32)
        s = F64(e) * cd + F64(q0)
        q = s.astype(F32)
        qd = F64(q)
        up, down = np.nextafter(q, F32(np.inf)).astype(F64), np.nextafter(q, F32(-np.inf)).astype(F64)
        tol = np.abs(s) * 2.0**-45
        near = (np.abs(s - (qd + up) / 2) <= tol) | (np.abs(s - (qd + down) / 2) <= tol)
        for i in np.nonzero(near)[0]:
            redone += 1
            q[i] = round_to_float32(Fraction(float(e[i])) * Fraction(float(c)) + Fraction(float(q0[i])))
        wrong = (q.view(np.uint32) != expect.view(np.uint32)) & ~((expect <= FLOOR) & (q <= FLOOR))
        if wrong.any():
            i = np.nonzero(wrong)[0][:5]
            print(f"  QMAX {qmax}: amax {amax[i]} gives {q[i]}, division {expect[i]}")
        wrong_total += int(wrong.sum())
    return wrong_total, redone


def main() -> int:
    ranges = {
        "[0, 2^-99)": (0, bits_of(2.0**-99)),
        "[1, 2)": (bits_of(1.0), bits_of(2.0)),
        "[2, 4)": (bits_of(2.0), bits_of(4.0)),
        "[2^127, max]": (bits_of(2.0**127), 0x7F800000),
    }
    failed = 0
    for qmax in (448.0, 240.0, 127.0):
        for name, (lo, hi) in ranges.items():
            wrong, redone = counterexamples(qmax, lo, hi)
            print(f"QMAX {qmax:5.0f} amax in {name:13s} {hi - lo:10d} values: {wrong} wrong ({redone} redone exactly)",
                  flush=True)
            failed += wrong
    print("proved" if not failed else f"{failed} counterexamples")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

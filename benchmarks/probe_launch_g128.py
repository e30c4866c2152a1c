"""Launch shapes of groups of 128 under programmatic dependent launch (issue 16, item 4): the probe behind
``FWD_TUNED`` / ``BWD_TUNED`` for groups of 128 in ``backends/triton/launch.py``.

Two tables, bf16 gated RMSNorm (gate after), N = 128, per row count, us per call in a CUDA graph (forward: 100
calls, forward+backward: 20; best of 3) and x torch.mul's graph figure:

* ``forward``: forward launch shapes (ROWS, num_warps; None = what the launcher picks) with and without PDL,
  forward alone and forward + backward (the backward as the launcher picks it);
* ``backward``: forward at 16 rows / 4 warps and at 32 rows / 8 warps, each with backward shapes (BLOCK, ROWS,
  num_warps, programs per SM, groups fastest; None = the launcher's), PDL on; dx and dz compared bit for bit
  with the first combination.

Results (H200, 2026-12-04): ``benchmarks/results/probe_launch_g128_h200.json`` (this script on the shipped
shapes: "None" is 32 rows / 8 warps forward and backward) and ``pdl_probe_g128_h200.json`` (the probes before
the change, "None" then 16 rows / 4 warps forward, 16 / 8 / 4 backward); the latter's "end" variant came from the
forward table run on a copy of the kernels whose ``_pdl_prologue`` left out ``gdc_launch_dependents()`` (the
dependent then released at the forward's exit), a source change this script does not make.

    PYTHONPATH=src python benchmarks/probe_launch_g128.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_timing import cuda_graph_ms  # noqa: E402

import gatednorm.backends.triton.launch as tk  # noqa: E402
from gatednorm.spec import NormSpec  # noqa: E402

ROW_COUNTS = (2048, 4096, 8192, 16384, 65536)
FORWARD_SHAPES = (None, (16, 4), (32, 8), (32, 4))
BACKWARD_SHAPES = (None, (128, 16, 8, 2, False), (128, 16, 4, 4, False), (128, 16, 4, 2, False),
                   (128, 32, 8, 4, False), (128, 8, 4, 4, False), (128, 16, 8, 8, False))
SPEC = NormSpec(1e-6, 128, True, True, "swish")


def _inputs(m: int, gen: torch.Generator):
    x, z, dy = (torch.randn(m, 128, device="cuda", generator=gen).bfloat16() for _ in range(3))
    w = torch.randn(128, device="cuda", generator=gen).bfloat16()
    return x, z, dy, w, torch.empty_like(x)


def _fwd_config(shape):
    return None if shape is None else (128, shape[0], shape[1], tk.ORDER_ROWS_FASTEST)


def _mul_us(x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> float:
    return min(cuda_graph_ms(lambda: torch.mul(x, z, out=y)) for _ in range(3)) * 1e3


def _forward_rows(m: int, gen: torch.Generator) -> list[dict]:
    x, z, dy, w, y = _inputs(m, gen)
    mul = _mul_us(x, z, y)
    rows = []
    for shape in FORWARD_SHAPES:
        for pdl in (True, False):
            config = _fwd_config(shape)

            def fwd(config=config, pdl=pdl):
                return tk.forward(x, w, None, z, SPEC, y, config=config, pdl=pdl)

            def fwd_bwd(config=config, pdl=pdl):
                _, rstd = fwd(config, pdl)
                tk.backward(dy, x, w, None, z, None, rstd, SPEC, True, True, True, False, pdl=pdl)

            f = min(cuda_graph_ms(fwd) for _ in range(3)) * 1e3
            b = min(cuda_graph_ms(fwd_bwd, 20) for _ in range(3)) * 1e3
            rows.append(dict(rows=m, cfg=shape, pdl=pdl, mul=mul, fwd=f, fb=b, fwd_x=f / mul, fb_x=b / mul))
            print(f"forward  m={m:6d} fwd {str(shape):8s} pdl={pdl!s:5s} fwd {f:.2f} us ({f / mul:.2f}x) "
                  f"fwd+bwd {b:.2f} us ({b / mul:.2f}x)", flush=True)
    return rows


def _backward_rows(m: int, gen: torch.Generator) -> list[dict]:
    x, z, dy, w, y = _inputs(m, gen)
    mul = _mul_us(x, z, y)
    rows = []
    ref = None
    for fshape in ((16, 4), (32, 8)):
        for bshape in BACKWARD_SHAPES:
            config = _fwd_config(fshape)

            def fwd_bwd(config=config, bshape=bshape):
                _, rstd = tk.forward(x, w, None, z, SPEC, y, config=config, pdl=True)
                return tk.backward(dy, x, w, None, z, None, rstd, SPEC, True, True, True, False, pdl=True,
                                   config=bshape)

            grads = fwd_bwd()
            torch.cuda.synchronize()
            if ref is None:
                ref = [g.clone() for g in grads[:2]]
            same = all(torch.equal(a, b) for a, b in zip(grads[:2], ref, strict=True))
            b = min(cuda_graph_ms(fwd_bwd, 20) for _ in range(3)) * 1e3
            rows.append(dict(rows=m, fwd=fshape, bwd=bshape, mul=mul, fb=b, fb_x=b / mul, same_dx_dz=same))
            print(f"backward m={m:6d} fwd {fshape} bwd {str(bshape):28s} fwd+bwd {b:.2f} us ({b / mul:.2f}x) "
                  f"dx, dz bits {'same' if same else 'DIFFER'}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="", help="write both tables here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_launch_g128.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"device": torch.cuda.get_device_name(),
              "forward": [r for m in ROW_COUNTS for r in _forward_rows(m, gen)],
              "backward": [r for m in ROW_COUNTS for r in _backward_rows(m, gen)]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""The ``gatednorm`` command: ``verify`` (precision report)."""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from .functional import layer_norm_fwd
from .reference import gated_norm_reference

# Tolerance for one rounding of the output dtype, relative to max(1, |ref|): half an ulp of the
# output plus float32 accumulation error of the statistics.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (got.double() - ref.double()).abs() / ref.double().abs().clamp_min(1.0)
    return float(diff.max()) if diff.numel() else 0.0


def _quick_cases(device: torch.device):
    shapes = [(64, 128, 128), (16, 512, 128), (8, 640, 640)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for (m, n, gs), dtype, rms, gate in itertools.product(shapes, dtypes, (False, True), ("none", "after", "before")):
        yield m, n, gs, dtype, rms, gate


def verify(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    rows = []
    failures = 0
    for m, n, gs, dtype, rms, gate in _quick_cases(device):
        x = torch.randn(m, n, generator=gen).to(device, dtype)
        z = torch.randn(m, n, generator=gen).to(device, dtype) if gate != "none" else None
        w = (1 + 0.1 * torch.randn(n, generator=gen)).to(device, dtype)
        b = None if rms else (0.1 * torch.randn(n, generator=gen)).to(device, dtype)
        nbg = gate != "before"
        y, _, _ = layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms,
                                 backend=args.backend)
        ref, _, _ = gated_norm_reference(x, w, b, z, 1e-6, gs, nbg, rms)
        err = _relative_error(y.cpu(), ref.cpu())
        torch_err = float("nan")
        if gate == "none" and gs == n:
            if rms:
                tref = F.rms_norm(x.float(), (n,), w.float(), 1e-6)
            else:
                tref = F.layer_norm(x.float(), (n,), w.float(), b.float(), 1e-6)
            torch_err = _relative_error(y.cpu(), tref.cpu())
        ok = err <= TOLERANCE[dtype] and (torch_err != torch_err or torch_err <= TOLERANCE[dtype])
        failures += not ok
        rows.append((f"{m}x{n}/{gs}", str(dtype).replace("torch.", ""), "rms" if rms else "ln", gate,
                     f"{err:.2e}", f"{torch_err:.2e}", "ok" if ok else "FAIL"))
    header = ("shape/group", "dtype", "norm", "gate", "vs float64", "vs F.*_norm", "result")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"\n{len(rows) - failures}/{len(rows)} cases within tolerance on {device}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatednorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check the backends against float64 and PyTorch's norms")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None)
    p.add_argument("--quick", action="store_true", help="a small set of shapes")
    p.add_argument("--seed", type=int, default=0)
    # --- integrations (issue 4): install-hook / uninstall-hook ---
    for name in ("install-hook", "uninstall-hook"):
        h = sub.add_parser(name, help=f"{name.split('-')[0]} the opt-in .pth hook that applies GATEDNORM_PATCH "
                                      "at interpreter start")
        h.add_argument("--site-dir", default=None, help="directory for the .pth file (default: site-packages)")
    # --- end integrations ---
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args)
    if args.command in ("install-hook", "uninstall-hook"):  # integrations (issue 4)
        from .integrations._hook import main as hook_main

        return hook_main(args.command, args.site_dir)
    return 2


if __name__ == "__main__":
    sys.exit(main())

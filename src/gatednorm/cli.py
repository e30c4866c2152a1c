"""The ``gatednorm`` command (also ``python -m gatednorm``).

Subcommands are registered by :func:`build_parser`; each ``add_*_parser`` function adds one
subparser and sets ``func`` (called with the parsed namespace, returns the exit code).

``gatednorm verify``: the precision report. Runs every backend available on ``--device`` over the
variant matrix against float64, PyTorch's norms and (when installed) the upstream Triton kernel;
prints max/mean absolute error, max error in ulps of the output dtype and pass/fail against the
documented tolerance (see :mod:`gatednorm.verification`); exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

from . import verification as V

# ---------------------------------------------------------------------------
# Progress and table output (rich when installed, plain text otherwise)
# ---------------------------------------------------------------------------

def _rich_console(stderr: bool = False):
    try:
        from rich.console import Console  # optional: never a dependency
    except ImportError:
        return None
    return Console(stderr=stderr)


class _Progress:
    """A progress bar on stderr: rich's when installed and stderr is a terminal, else plain lines."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self._rich = None
        self._last = 0.0
        if enabled and sys.stderr.isatty():
            try:
                from rich.progress import Progress
            except ImportError:
                pass
            else:
                self._rich = Progress(transient=True)
                self._task = self._rich.add_task("verifying", total=total)
                self._rich.start()

    def advance(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, advance=1, description=label[:40])
            return
        now = time.monotonic()
        if now - self._last >= 2.0 or self.done == self.total:  # plain: a line every 2 s at most
            self._last = now
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def _fmt(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.2e}"


ULP_NOTE = ("ulps are measured against the float64 value rounded to the output dtype; large float32 counts come "
            "from outputs that nearly cancel (xhat*w + b ~ 0), where a float32-accurate result is many ulps of a "
            "tiny value. err/tol (<= 1 passes) is the criterion.")

HEADER = ("backend", "reference", "dtype", "quantity", "cases", "max abs", "mean abs", "max ulps", "err/tol",
          "result")


def _table_rows(summary: list[V.SummaryRow]) -> list[tuple[str, ...]]:
    return [
        (s.backend, s.reference, s.dtype, s.quantity, str(s.cases), _fmt(s.max_abs), _fmt(s.mean_abs),
         f"{s.max_ulps:.1f}", f"{s.worst_ratio:.3f}", "ok" if not s.failed else f"FAIL {s.failed}")
        for s in summary
    ]


def _print_table(rows: list[tuple[str, ...]], title: str, use_rich: bool) -> None:
    console = _rich_console() if use_rich else None
    if console is not None:
        from rich.table import Table

        table = Table(title=title)
        for h in HEADER:
            table.add_column(h, justify="right" if h in ("cases", "max abs", "mean abs", "max ulps", "err/tol")
                             else "left")
        for r in rows:
            table.add_row(*r, style=None if r[-1] == "ok" else "bold red")
        console.print(table)
        return
    widths = [max(len(str(r[i])) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    print(title)
    for r in [HEADER, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def _markdown(summary: list[V.SummaryRow], results: list[V.Result], meta: dict) -> str:
    lines = [f"# gatednorm verify: {meta['device']} ({meta['device_name']})", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in ("device",)]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _table_rows(summary)]
    tolerance_doc = V.__doc__.split("Tolerance (per element")[1].split("\n", 2)[2].strip()
    lines += ["", ULP_NOTE, "", "## Tolerance", "", tolerance_doc, ""]
    failed = [r for r in results if not r.passed]
    if failed:
        lines += ["## Failures", "", "| backend | shape | variant | reference | quantity | err/tol | error |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.backend} | {r.shape} | {r.variant} | {r.reference} | {r.quantity} | "
                  f"{r.comparison.worst_ratio:.3g} | {r.error} |" for r in failed]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------

def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_verify_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("verify", help="check every backend against float64, PyTorch's norms and upstream",
                       description="Precision report: every available backend over the variant matrix, "
                                   "against float64, F.layer_norm/F.group_norm/F.rms_norm and the upstream "
                                   "Triton kernel (fla-core) when installed. Exit code 1 on any failure.")
    p.add_argument("--device", default=_default_device(), help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", action="append", default=None,
                   help="only this backend (repeatable; default: every backend available on the device)")
    p.add_argument("--quick", action="store_true", help="a small set of shapes (CI)")
    p.add_argument("--dtype", action="append", choices=list(V.DTYPES), default=None,
                   help="only this dtype (repeatable; default float32, bfloat16, float16)")
    p.add_argument("--no-grad", dest="gradients", action="store_false", help="skip the gradient checks")
    p.add_argument("--no-upstream", dest="upstream", action="store_false",
                   help="skip the comparison with the upstream (fla-core) kernel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every case and the summary as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the summary table (and failures) as Markdown")
    p.add_argument("--verbose", "-v", action="store_true", help="print every failing case")
    p.add_argument("--plain", action="store_true", help="plain text even when rich is installed")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output on stderr")
    p.set_defaults(func=verify)
    return p


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def verify(args: argparse.Namespace) -> int:
    """Run the precision report; returns 0 when every check passes, 1 otherwise, 2 on a usage error."""
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        print(f"gatednorm verify: device {args.device!r} is not usable: {exc}", file=sys.stderr)
        return 2
    available = V.available_backends(device)
    backends = args.backend or available
    unknown = [b for b in backends if b not in available]
    if unknown:
        print(f"gatednorm verify: backend(s) {unknown} not available on {device}; available: {available}",
              file=sys.stderr)
        return 2
    dtypes = tuple(args.dtype or ("float32", "bfloat16", "float16"))
    shapes = V.QUICK_SHAPES if args.quick else V.FULL_SHAPES
    fla = V.upstream_kernel(device) if args.upstream else (None, None, "disabled (--no-upstream)")
    variants = list(V.variants(dtypes))
    jobs = [(b, s, v) for b in backends for s in shapes for v in variants
            if v.grouped is False or (s.group_size is not None and s.group_size != s.n)]

    gen = torch.Generator().manual_seed(args.seed)
    progress = _Progress(len(jobs), enabled=args.progress)
    results: list[V.Result] = []
    start = time.perf_counter()
    try:
        for b, s, v in jobs:
            results.extend(V.run_case(b, s, v, device, gen, fla=fla if fla[0] is not None else None,
                                      gradients=args.gradients))
            progress.advance(f"{b} {s.name} {v.label()}")
    finally:
        progress.close()
    elapsed = time.perf_counter() - start

    summary = V.summarize(results)
    failed = [r for r in results if not r.passed]
    meta = {
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "backends": ", ".join(backends),
        "upstream": "fla-core" if fla[0] is not None else f"skipped: {fla[2]}",
        "shapes": "; ".join(f"{s.name}" for s in shapes),
        "eps": V.EPS,
        "cases": len(jobs),
        "checks": len(results),
        "failed": len(failed),
        "seconds": round(elapsed, 1),
    }
    use_rich = not args.plain
    _print_table(_table_rows(summary), f"gatednorm verify on {device} ({meta['device_name']}), "
                 f"torch {torch.__version__}, upstream: {meta['upstream']}", use_rich)
    if args.verbose and failed:
        print("\nfailing cases:")
        for r in failed:
            print(f"  {r.backend} {r.shape} {r.variant} vs {r.reference} {r.quantity}: "
                  f"err/tol {r.comparison.worst_ratio:.3g} {r.error}")
    print(f"\n{len(results) - len(failed)}/{len(results)} checks within tolerance "
          f"({len(jobs)} cases, {elapsed:.1f} s). Tolerance: |got-ref| <= u(O)*(|ref|+e) + e + min_spacing(O)/2, "
          f"e = K*u(C)*A, K = 8+log2(group_size) (see gatednorm.verification).\n{ULP_NOTE}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "tolerance": V.tolerance_table(),
                       "summary": [s.to_dict() for s in summary],
                       "results": [r.to_dict() for r in results]}, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_markdown(summary, results, meta))
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def add_hook_parsers(sub: argparse._SubParsersAction) -> None:
    """``install-hook`` / ``uninstall-hook``: the opt-in .pth file that applies GATEDNORM_PATCH at start-up."""

    def run(args: argparse.Namespace) -> int:
        from .integrations._hook import main as hook_main

        return hook_main(args.command, args.site_dir)

    for name, verb in (("install-hook", "install"), ("uninstall-hook", "remove")):
        h = sub.add_parser(name, help=f"{verb} the opt-in .pth hook that applies GATEDNORM_PATCH at interpreter start")
        h.add_argument("--site-dir", default=None, help="directory for the .pth file (default: site-packages)")
        h.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """The ``gatednorm`` parser; add a subcommand with one ``add_<name>_parser(sub)`` call here."""
    parser = argparse.ArgumentParser(prog="gatednorm", description="gated, grouped LayerNorm/RMSNorm tools")
    sub = parser.add_subparsers(dest="command", required=True)
    add_verify_parser(sub)
    add_hook_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

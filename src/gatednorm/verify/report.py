"""What ``gatednorm verify`` reports: the summary table, the JSON and Markdown files, the exit code.

Results are aggregated per (backend, reference, dtype, quantity) by :func:`summarize` (the quantized
cases' rows have the reference ``float64/<format>`` and the quantities ``scale`` and ``q``); the table
is printed with rich when installed and stdout is a terminal, as plain text otherwise. The JSON
file's schema is docs/verify-json.md (:data:`SCHEMA_VERSION`); :func:`load_json_report` reads it,
and upgrades files written before the schema had a version.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._platform import device_name, quiet_closed_stdout  # device_name: as gatednorm info names devices
from .._version import __version__
from .cases import DTYPES, EPS, Shape
from .quantized import QUANT_QUANTITIES, QUANT_RULE
from .runner import QUANTITIES, Result, Upstream
from .tolerance import TOLERANCE_DOC, TOLERANCE_RULE, tolerance_table

#: Version of the ``--json`` file's layout (docs/verify-json.md). Files without ``schema_version`` are version 0.
SCHEMA_VERSION = 1

#: Exit codes of ``gatednorm verify``.
EXIT_OK = 0
EXIT_FAILED = 1  # a check failed (wins over an incomplete run), or a --jobs worker crashed
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3  # stopped early (--max-seconds, SIGTERM, Ctrl-C) without a failure

ULP_NOTE = ("ulps are measured against the float64 value rounded to the output dtype; large float32 counts come "
            "from outputs that nearly cancel (xhat*w + b ~ 0), where a float32-accurate result is many ulps of a "
            "tiny value. err/tol (<= 1 passes) is the criterion.")

HEADER = ("backend", "reference", "dtype", "quantity", "cases", "max abs", "mean abs", "max ulps", "err/tol",
          "result")


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------

@dataclass
class SummaryRow:
    """The worst errors of one (backend, reference, dtype, quantity) over all shapes and variants."""

    backend: str
    reference: str
    dtype: str
    quantity: str
    cases: int = 0
    failed: int = 0
    max_abs: float = 0.0
    mean_abs_sum: float = 0.0
    max_ulps: float = 0.0
    worst_ratio: float = 0.0

    @property
    def mean_abs(self) -> float:
        return self.mean_abs_sum / self.cases if self.cases else 0.0

    def to_dict(self) -> dict:
        """One row of the JSON report's ``summary``."""
        d = dataclasses.asdict(self)
        d.pop("mean_abs_sum")
        d["mean_abs"] = self.mean_abs
        d["passed"] = self.failed == 0
        return d


def summarize(results: list[Result]) -> list[SummaryRow]:
    """Aggregate per (backend, reference, dtype, quantity): worst errors over all shapes and variants."""
    table: dict[tuple, SummaryRow] = {}
    mean_abs: dict[tuple, list[float]] = {}
    for r in results:
        key = (r.backend, r.reference, r.dtype, r.quantity)
        row = table.setdefault(key, SummaryRow(*key))
        row.cases += 1
        row.failed += not r.passed
        c = r.comparison
        if not r.error:
            row.max_abs = max(row.max_abs, c.max_abs)
            mean_abs.setdefault(key, []).append(c.mean_abs)
            row.max_ulps = max(row.max_ulps, c.max_ulps)
            row.worst_ratio = max(row.worst_ratio, c.worst_ratio)
        else:
            row.worst_ratio = math.inf
    for key, values in mean_abs.items():  # exactly rounded: the same table whatever the order (verify --jobs)
        table[key].mean_abs_sum = math.fsum(values)
    ref_order = {"float64": 0, "F.layer_norm": 1, "F.group_norm": 2, "F.rms_norm": 3, "fla": 4}
    q_order = {q: i for i, q in enumerate((*QUANTITIES, *QUANT_QUANTITIES))}
    d_order = {d: i for i, d in enumerate(DTYPES)}
    # the quantized rows (float64/<format>) after the norm's, by format
    return sorted(table.values(), key=lambda s: (s.backend, ref_order.get(s.reference, 9), s.reference,
                                                 d_order.get(s.dtype, 9), q_order.get(s.quantity, 99)))


def has_quant_rows(results: Sequence[Result]) -> bool:
    """Whether ``results`` hold checks of the quantized output (quantity ``scale`` or ``q``)."""
    return any(r.quantity in QUANT_QUANTITIES for r in results)


def exit_code(meta: dict) -> int:
    """:data:`EXIT_FAILED` if a check failed, else :data:`EXIT_OK` when complete, else :data:`EXIT_INCOMPLETE`."""
    return EXIT_FAILED if meta["failed"] else (EXIT_OK if meta["complete"] else EXIT_INCOMPLETE)


# ---------------------------------------------------------------------------
# Run metadata
# ---------------------------------------------------------------------------

def build_meta(device: torch.device, backends: Sequence[str], upstream: Upstream, shapes: Sequence[Shape],
               cases: int, cases_run: int, results: Sequence[Result], stopped: str, current: str,
               elapsed: float) -> dict:
    """The ``meta`` block of the reports: what ran, where, how far it got and why it stopped.

    ``stopped`` says why the run ended early ("" when it did not), ``current`` names the case that a
    signal interrupted ("" when none).
    """
    complete = cases_run == cases
    status = "complete" if complete else f"incomplete: {cases_run} of {cases} cases run"
    if not complete:
        status += f" ({stopped})" if stopped else " (still running)"
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "gatednorm": __version__,
        "backends": list(backends),
        "upstream": "fla-core" if upstream[0] is not None else f"skipped: {upstream[2]}",
        "shapes": [s.name for s in shapes],
        "eps": EPS,
        "complete": complete,
        "status": status,
        "cases": cases,
        "cases_run": cases_run,
        "stopped": stopped or None,
        "interrupted_case": current or None,
        "checks": len(results),
        "failed": sum(not r.passed for r in results),
        "seconds": round(elapsed, 1),
    }


# ---------------------------------------------------------------------------
# The table on stdout
# ---------------------------------------------------------------------------

def _fmt(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.2e}"


def table_rows(summary: list[SummaryRow]) -> list[tuple[str, ...]]:
    """The summary as text cells, in :data:`HEADER`'s columns."""
    return [
        (s.backend, s.reference, s.dtype, s.quantity, str(s.cases), _fmt(s.max_abs), _fmt(s.mean_abs),
         f"{s.max_ulps:.1f}", f"{s.worst_ratio:.3f}", "ok" if not s.failed else f"FAIL {s.failed}")
        for s in summary
    ]


def _rich_console(stderr: bool = False):
    try:
        from rich.console import Console  # optional: never a dependency
    except ImportError:
        return None
    return Console(stderr=stderr)


def print_table(rows: list[tuple[str, ...]], title: str, use_rich: bool) -> None:
    """Print the table: rich when asked for, installed and stdout is a terminal; aligned plain text otherwise."""
    # rich only on a terminal: piped into a log it would squeeze the table into 80 columns
    console = _rich_console() if use_rich and sys.stdout.isatty() else None
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


def print_report(summary: list[SummaryRow], results: list[Result], meta: dict, use_rich: bool,
                 verbose: bool) -> None:
    """The end of a run on stdout: the table, failing cases (``verbose``), the totals, and whether it stopped early.

    When stdout's reader has gone away (``gatednorm verify | head``), the rest goes to ``os.devnull``: the
    run still writes its --json/--markdown files and exits with its verdict, without a traceback.
    """
    try:
        _print_report(summary, results, meta, use_rich, verbose)
        sys.stdout.flush()
    except BrokenPipeError:
        quiet_closed_stdout()


def _print_report(summary: list[SummaryRow], results: list[Result], meta: dict, use_rich: bool,
                  verbose: bool) -> None:
    failed = [r for r in results if not r.passed]
    done, total = meta["cases_run"], meta["cases"]
    print_table(table_rows(summary), f"gatednorm verify on {meta['device']} ({meta['device_name']}), "
                f"torch {meta['torch']}, upstream: {meta['upstream']}", use_rich)
    if verbose and failed:
        print("\nfailing cases:")
        for r in failed:
            print(f"  {r.backend} {r.shape} {r.variant} vs {r.reference} {r.quantity}: "
                  f"err/tol {r.comparison.worst_ratio:.3g} {r.error}")
    print(f"\n{len(results) - len(failed)}/{len(results)} checks within tolerance "
          f"({done} of {total} cases, {meta['seconds']:.1f} s). Tolerance: {TOLERANCE_RULE}, "
          f"K = 8+log2(group_size) (see gatednorm.verify.tolerance).\n{ULP_NOTE}")
    if has_quant_rows(results):
        print(f"{QUANT_RULE} (see gatednorm.verify.quantized)")
    if not meta["complete"]:
        current = meta["interrupted_case"]
        print(f"\nINCOMPLETE: {done} of {total} cases run ({meta['stopped'] or ''})"
              + (f"; stopped during: {current}" if current else "") + ".", flush=True)


# ---------------------------------------------------------------------------
# --json and --markdown
# ---------------------------------------------------------------------------

def json_report(summary: list[SummaryRow], results: list[Result], meta: dict) -> str:
    """The ``--json`` file (docs/verify-json.md): ``schema_version``, ``complete``, ``meta``, the tolerance
    per dtype, the summary and every result.

    ``complete`` is at the top level only (``meta`` without it). ``verify --jobs`` reads its workers'
    reports back with :func:`load_json_report` and :meth:`Result.from_dict`.
    """
    return json.dumps({"schema_version": SCHEMA_VERSION, "complete": meta["complete"],
                       "meta": {k: v for k, v in meta.items() if k != "complete"},
                       "tolerance": tolerance_table(),
                       "summary": [s.to_dict() for s in summary],
                       "results": [r.to_dict() for r in results]}, indent=1, default=str)


#: Version 0 (before ``schema_version``) tolerance keys -> version 1.
_V0_TOLERANCE_KEYS = {"rounding u(O)": "unit_roundoff_output", "compute u(C)": "unit_roundoff_compute"}


def upgrade_json_report(data: dict) -> dict:
    """A ``--json`` report in the current layout (:data:`SCHEMA_VERSION`), from any earlier one.

    Version 0 (no ``schema_version``) had ``complete`` both at the top and in ``meta``, tolerance keys
    with spaces (``"rounding u(O)"``, ``"compute u(C)"``), and ``meta.backends`` / ``meta.shapes`` as
    one string (", " / "; " separated). ``data`` is not modified. Raises ``ValueError`` for a report
    from a newer gatednorm (a ``schema_version`` above this one's) or one that is not a report.
    """
    if not isinstance(data, dict) or "meta" not in data or "results" not in data:
        raise ValueError("not a gatednorm verify --json report: expected an object with 'meta' and 'results'")
    version = data.get("schema_version", 0)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"verify report schema_version {version!r} is newer than this gatednorm reads "
                         f"({SCHEMA_VERSION}); upgrade gatednorm")
    if version == SCHEMA_VERSION:
        return data
    meta = dict(data["meta"])
    complete = data.get("complete", meta.get("complete", meta.get("cases_run") == meta.get("cases")))
    meta.pop("complete", None)
    for key, sep in (("backends", ","), ("shapes", ";")):
        if isinstance(meta.get(key), str):
            meta[key] = [part.strip() for part in meta[key].split(sep) if part.strip()]
    tolerance = [{_V0_TOLERANCE_KEYS.get(k, k): v for k, v in row.items()} for row in data.get("tolerance", [])]
    return {**data, "schema_version": SCHEMA_VERSION, "complete": complete, "meta": meta, "tolerance": tolerance}


def load_json_report(path: str) -> dict:
    """Read a ``verify --json`` file, of this or an earlier schema version, in the current layout."""
    with open(path) as f:
        return upgrade_json_report(json.load(f))


def markdown(summary: list[SummaryRow], results: list[Result], meta: dict) -> str:
    """The ``--markdown`` file: meta, the summary table, the tolerance explained, and the failures."""
    lines = [f"# gatednorm verify: {meta['device']} ({meta['device_name']})", ""]
    if not meta["complete"]:
        lines += [f"**{meta['status']}**" + (f"; stopped during: {meta['interrupted_case']}"
                                             if meta["interrupted_case"] else ""), ""]
    lines += [f"- {k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in meta.items()
              if k not in ("device",)]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(summary)]
    lines += ["", ULP_NOTE, "", "## Tolerance", "", TOLERANCE_DOC, ""]
    if has_quant_rows(results):
        lines += ["## Quantized output", "", QUANT_RULE, ""]
    failed = [r for r in results if not r.passed]
    if failed:
        lines += ["## Failures", "", "| backend | shape | variant | reference | quantity | err/tol | error |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.backend} | {r.shape} | {r.variant} | {r.reference} | {r.quantity} | "
                  f"{r.comparison.worst_ratio:.3g} | {r.error} |" for r in failed]
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    """Write via a temporary file and rename, so a reader (or a kill mid-write) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

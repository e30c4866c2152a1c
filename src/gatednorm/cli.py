"""The ``gatednorm`` command (also ``python -m gatednorm``).

Subcommands are registered by :func:`build_parser`; each ``add_*_parser`` function adds one
subparser and sets ``func`` (called with the parsed namespace, returns the exit code).

``gatednorm verify``: the precision report. Runs every backend available on ``--device`` over the
variant matrix against float64, PyTorch's norms and (when installed) the upstream Triton kernel;
prints max/mean absolute error, max error in ulps of the output dtype and pass/fail against the
documented tolerance (see :mod:`gatednorm.verification`); exits 1 on any failure.

Under a time limit: cases run breadth first (:func:`gatednorm.verification.case_order`), so a run
stopped early has covered every backend, dtype, shape and norm kind; ``--max-seconds S`` stops
starting cases after S seconds, and SIGTERM (what ``timeout`` sends) or Ctrl-C stop at once. Either
way the table and --json/--markdown cover the cases that ran, marked incomplete ("complete": false),
and the exit code is 3 (1 if a check failed). While running, --json/--markdown are rewritten as
partial reports every minute, in case the process is killed without warning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from typing import TYPE_CHECKING

import torch

from . import verification as V

if TYPE_CHECKING:
    from collections.abc import Iterator

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
    """Progress on stderr: rich's bar when installed, enabled and stderr is a terminal; otherwise a
    short heartbeat line (cases done / total, elapsed, current case) every ``every`` seconds.

    The heartbeat runs on a daemon thread so that a log shows progress (and which case is running)
    even while one case takes long, e.g. while Triton JIT-compiles a kernel variant on a GPU.
    """

    def __init__(self, total: int, bar: bool = True, every: float = 10.0) -> None:
        self.total, self.done, self.every = total, 0, every
        self.current = ""
        self._rich = None
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if bar and sys.stderr.isatty():
            try:
                from rich.progress import Progress
            except ImportError:
                pass
            else:
                self._rich = Progress(transient=True)
                self._task = self._rich.add_task("verifying", total=total)
                self._rich.start()
                return
        if every > 0:
            self._thread = threading.Thread(target=self._heartbeat, name="gatednorm-verify-progress", daemon=True)
            self._thread.start()

    def line(self) -> str:
        return (f"gatednorm verify: {self.done}/{self.total} cases, {time.monotonic() - self._start:.0f} s"
                + (f", running: {self.current}" if self.current else ""))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.every):
            print(self.line(), file=sys.stderr, flush=True)

    def start_case(self, label: str) -> None:
        self.current = label

    def advance(self, label: str) -> None:
        self.set_done(self.done + 1, label)

    def set_done(self, done: int, label: str = "") -> None:
        self.done = done
        self.current = ""
        if self._rich is not None:
            self._rich.update(self._task, completed=done, description=label[:40])

    def close(self) -> None:
        self._stop.set()
        if self._rich is not None:
            self._rich.stop()
        elif self._thread is not None:
            self._thread.join(timeout=1.0)
            self.current = ""
            print(self.line(), file=sys.stderr, flush=True)  # the final count, always in the log


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


def _markdown(summary: list[V.SummaryRow], results: list[V.Result], meta: dict) -> str:
    lines = [f"# gatednorm verify: {meta['device']} ({meta['device_name']})", ""]
    if not meta["complete"]:
        lines += [f"**{meta['status']}**" + (f"; stopped during: {meta['interrupted_case']}"
                                             if meta["interrupted_case"] else ""), ""]
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
                   help="only this backend (repeatable; default: every backend available on the device "
                        "except 'compiled', which compiles per feature combination)")
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
    p.add_argument("--plain", action="store_true",
                   help="plain text even when rich is installed (always, when stdout is not a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar; a short status line on stderr every --progress-every seconds instead "
                        "(also the default when stderr is not a terminal)")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="S",
                   help="seconds between status lines without a progress bar (default 10; 0: none)")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="start no new case after S seconds; report what ran, mark the JSON/Markdown incomplete "
                        f"and exit {EXIT_INCOMPLETE} (1 if a check failed). A case that started runs to its end "
                        "(on a GPU the first use of a kernel variant JIT-compiles, which can take a while), so "
                        "leave headroom under an outer time limit; SIGTERM/Ctrl-C also stop and report")
    p.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                   help="run the cases in N worker processes and merge their reports (default 1). On a GPU the "
                        "first use of each kernel variant JIT-compiles on the CPU: workers compile side by side "
                        "(cases of one shape and variant stay in one worker). Each worker gets cpu_count/N threads")
    p.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                   help="run only worker K's share of N (what --jobs gives each worker; K counts from 0)")
    p.add_argument("--progress-file", default=None, help=argparse.SUPPRESS)  # --jobs workers: "done total"
    p.set_defaults(func=verify)
    return p


def _shard(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N) with 0 <= K < N (argparse type of --shard)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N with integers, e.g. 0/4, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"expected 0 <= K < N, got {text!r}")
    return k, n


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def verify(args: argparse.Namespace) -> int:
    """Run the precision report; returns 0 when every check passes, 1 on any failure, 2 on a usage error,
    3 (:data:`EXIT_INCOMPLETE`) when the run stopped early (--max-seconds, SIGTERM, Ctrl-C) without a failure."""
    start = time.monotonic()
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        print(f"gatednorm verify: device {args.device!r} is not usable: {exc}", file=sys.stderr)
        return 2
    available = V.available_backends(device)
    # 'compiled' compiles once per feature combination (minutes over the whole matrix): only on request
    backends = args.backend or [b for b in available if b != "compiled"]
    unknown = [b for b in backends if b not in available]
    if unknown:
        print(f"gatednorm verify: backend(s) {unknown} not available on {device}; available: {available}",
              file=sys.stderr)
        return 2
    dtypes = tuple(args.dtype or ("float32", "bfloat16", "float16"))
    shapes = V.QUICK_SHAPES if args.quick else V.FULL_SHAPES
    fla = V.upstream_kernel(device) if args.upstream else (None, None, "disabled (--no-upstream)")
    if args.jobs < 1:
        print(f"gatednorm verify: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    variants = list(V.variants(dtypes))
    jobs = V.case_order(backends, shapes, variants)
    if args.shard is not None:
        jobs = V.shard_jobs(jobs, *args.shard)
    elif args.jobs > 1:
        return _verify_parallel(args, device, backends, dtypes, shapes, fla, jobs, start)

    progress = _Progress(len(jobs), bar=args.progress, every=args.progress_every)
    results: list[V.Result] = []
    stopped = ""  # why the run ended early ("" when every case ran)
    current = ""  # the case that was running when a signal stopped the run
    done = 0
    last_checkpoint = time.monotonic()
    fla_arg = fla if fla[0] is not None else None

    def report(final: bool) -> int:
        return _verify_report(args, device, backends, shapes, fla, jobs, done, results, stopped, current,
                              time.monotonic() - start, final)

    with _stop_on_sigterm() as sigterm:
        try:
            for b, s, v in jobs:
                if args.max_seconds is not None and time.monotonic() - start >= args.max_seconds:
                    stopped = f"--max-seconds {args.max_seconds:g} reached"
                    break
                current = f"{b} {s.name} {v.label()}"
                progress.start_case(current)
                gen = torch.Generator().manual_seed(V.case_seed(args.seed, s, v))
                results.extend(V.run_case(b, s, v, device, gen, fla=fla_arg, gradients=args.gradients))
                done += 1
                current = ""
                progress.advance(f"{b} {s.name} {v.label()}")
                if args.progress_file:
                    _write_atomic(args.progress_file, f"{done} {len(jobs)}")
                if (args.json or args.markdown) and time.monotonic() - last_checkpoint >= _CHECKPOINT_SECONDS:
                    # a run killed without a chance to report (SIGKILL, a hung call) still leaves this
                    report(final=False)
                    last_checkpoint = time.monotonic()
        except (KeyboardInterrupt, _Terminated) as exc:
            stopped = "SIGTERM" if isinstance(exc, _Terminated) else "KeyboardInterrupt"
        finally:
            sigterm.armed = False
            progress.close()
        return report(final=True)


#: Seconds between the partial --json/--markdown files written while verify runs.
_CHECKPOINT_SECONDS = 60.0

#: Exit code of a run that stopped early (--max-seconds, SIGTERM, Ctrl-C) without a failure.
EXIT_INCOMPLETE = 3


class _Terminated(BaseException):
    """Raised by verify's SIGTERM handler; a BaseException so run_case's ``except Exception`` lets it through."""


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[types.SimpleNamespace]:
    """While verify runs, SIGTERM (what ``timeout`` sends) stops it like Ctrl-C; the previous handler is
    restored afterwards. The handler raises only while ``state.armed`` (once): verify disarms it before
    it writes the final report, so a late or second signal cannot cut the report short."""
    state = types.SimpleNamespace(armed=True)
    if threading.current_thread() is not threading.main_thread():
        yield state  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        if state.armed:
            state.armed = False
            raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_command(args: argparse.Namespace, device: torch.device, backends: list[str], dtypes: tuple[str, ...],
                    shard: int, shards: int, json_path: str, progress_path: str, max_seconds: float | None
                    ) -> list[str]:
    """The ``verify`` command line of one ``--jobs`` worker: the parent's selection, one shard of it."""
    cmd = [sys.executable, "-m", "gatednorm", "verify", "--device", str(device), "--seed", str(args.seed),
           "--shard", f"{shard}/{shards}", "--json", json_path, "--progress-file", progress_path,
           "--no-progress", "--progress-every", "0", "--plain"]
    for b in backends:
        cmd += ["--backend", b]
    for d in dtypes:
        cmd += ["--dtype", d]
    if args.quick:
        cmd.append("--quick")
    if not args.gradients:
        cmd.append("--no-grad")
    if not args.upstream:
        cmd.append("--no-upstream")
    if max_seconds is not None:
        cmd += ["--max-seconds", f"{max(max_seconds, 0.0):.1f}"]
    return cmd


def _read_done(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _verify_parallel(args, device, backends, dtypes, shapes, fla, jobs, start) -> int:
    """``verify --jobs N``: N worker processes (``--shard K/N`` each), one merged report.

    Workers write JSON reports that are read back as :class:`~gatednorm.verification.Result` rows,
    so the table, --json and --markdown are the same as a single-process run's (same data: every
    case draws from its own seed). SIGTERM/Ctrl-C are passed on to the workers, which report what
    ran; a worker that dies without a report makes the run fail (exit 1) and its log is printed.
    """
    shards = min(args.jobs, len(jobs)) or 1
    threads = max(1, (os.cpu_count() or 1) // shards)
    tmp = tempfile.mkdtemp(prefix="gatednorm-verify-")
    paths = [(os.path.join(tmp, f"{k}.json"), os.path.join(tmp, f"{k}.progress"), os.path.join(tmp, f"{k}.log"))
             for k in range(shards)]
    remaining = None if args.max_seconds is None else args.max_seconds - (time.monotonic() - start)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    progress = _Progress(len(jobs), bar=args.progress, every=args.progress_every)
    progress.current = f"{shards} workers"
    procs: list[subprocess.Popen] = []
    stopped = ""
    with _stop_on_sigterm() as sigterm:
        try:
            for k, (json_path, progress_path, log_path) in enumerate(paths):
                with open(log_path, "w") as log:
                    procs.append(subprocess.Popen(
                        _worker_command(args, device, backends, dtypes, k, shards, json_path, progress_path,
                                        remaining), stdout=log, stderr=subprocess.STDOUT, env=env))
            while any(p.poll() is None for p in procs):
                time.sleep(0.5)
                progress.set_done(sum(_read_done(pp) for _, pp, _ in paths), f"{shards} workers")
                progress.current = f"{sum(p.poll() is None for p in procs)} of {shards} workers running"
        except (KeyboardInterrupt, _Terminated) as exc:
            stopped = "SIGTERM" if isinstance(exc, _Terminated) else "KeyboardInterrupt"
        finally:
            sigterm.armed = False
            for p in procs:  # let every worker stop and write its report (a no-op for finished ones)
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            progress.close()

    results: list[V.Result] = []
    done, reasons, interrupted, crashed = 0, set(), [], []
    for k, ((json_path, _, log_path), p) in enumerate(zip(paths, procs, strict=False)):
        try:
            with open(json_path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = None
        # a worker we stopped may die of the signal after writing its report (its handler is gone by then)
        if report is None or (p.returncode not in (0, 1, EXIT_INCOMPLETE) and not stopped):
            with open(log_path) as f:
                tail = f.read()[-3000:]
            crashed.append(k)
            print(f"gatednorm verify: worker {k}/{shards} exited with code {p.returncode}"
                  f"{'' if report else ' without a report'}; its log ends:\n{tail}", file=sys.stderr)
        if report is not None:
            results.extend(V.Result.from_dict(r) for r in report["results"])
            done += report["meta"]["cases_run"]
            if report["meta"].get("stopped"):
                reasons.add(report["meta"]["stopped"])
            if report["meta"].get("interrupted_case"):
                interrupted.append(report["meta"]["interrupted_case"])
    if crashed:
        reasons.add(f"worker(s) {crashed} crashed")
    if stopped:
        reasons.add(stopped)
    code = _verify_report(args, device, backends, shapes, fla, jobs, done, results, "; ".join(sorted(reasons)),
                          "; ".join(interrupted), time.monotonic() - start, final=True)
    if not crashed:
        for path in (q for triple in paths for q in triple):
            with contextlib.suppress(OSError):
                os.remove(path)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)
    return 1 if crashed else code


def _write_atomic(path: str, text: str) -> None:
    """Write via a temporary file and rename, so a reader (or a kill mid-write) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _verify_report(args, device, backends, shapes, fla, jobs, done, results, stopped, current, elapsed,
                   final: bool) -> int:
    """Summarise what ran; print the table (``final``) and write --json/--markdown; return the exit code."""
    summary = V.summarize(results)
    failed = [r for r in results if not r.passed]
    complete = done == len(jobs)
    status = "complete" if complete else f"incomplete: {done} of {len(jobs)} cases run"
    if not complete:
        status += f" ({stopped})" if stopped else " (still running)"
    meta = {
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "backends": ", ".join(backends),
        "upstream": "fla-core" if fla[0] is not None else f"skipped: {fla[2]}",
        "shapes": "; ".join(f"{s.name}" for s in shapes),
        "eps": V.EPS,
        "complete": complete,
        "status": status,
        "cases": len(jobs),
        "cases_run": done,
        "stopped": stopped or None,
        "interrupted_case": current or None,
        "checks": len(results),
        "failed": len(failed),
        "seconds": round(elapsed, 1),
    }
    if final:
        use_rich = not args.plain
        _print_table(_table_rows(summary), f"gatednorm verify on {device} ({meta['device_name']}), "
                     f"torch {torch.__version__}, upstream: {meta['upstream']}", use_rich)
        if args.verbose and failed:
            print("\nfailing cases:")
            for r in failed:
                print(f"  {r.backend} {r.shape} {r.variant} vs {r.reference} {r.quantity}: "
                      f"err/tol {r.comparison.worst_ratio:.3g} {r.error}")
        print(f"\n{len(results) - len(failed)}/{len(results)} checks within tolerance "
              f"({done} of {len(jobs)} cases, {elapsed:.1f} s). Tolerance: |got-ref| <= u(O)*(|ref|+e) + e + "
              f"min_spacing(O)/2, e = K*u(C)*A, K = 8+log2(group_size) (see gatednorm.verification).\n{ULP_NOTE}")
        if not complete:
            print(f"\nINCOMPLETE: {done} of {len(jobs)} cases run ({stopped})"
                  + (f"; stopped during: {current}" if current else "") + ".", flush=True)
    if args.json:
        _write_atomic(args.json, json.dumps({"complete": complete, "meta": meta, "tolerance": V.tolerance_table(),
                                             "summary": [s.to_dict() for s in summary],
                                             "results": [r.to_dict() for r in results]}, indent=1, default=str))
    if args.markdown:
        _write_atomic(args.markdown, _markdown(summary, results, meta))
    return 1 if failed else (0 if complete else EXIT_INCOMPLETE)


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

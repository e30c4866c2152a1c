"""One ``gatednorm verify`` run: from the parsed command line to the exit code.

:func:`run` resolves the options into a :class:`Plan` (device, backends, the ordered cases), runs
the cases in this process (:func:`run_cases`) or, with ``--jobs N``, in N worker processes
(:mod:`gatednorm.verify.parallel`), and reports (:mod:`gatednorm.verify.report`).

The cases are the norm's (:mod:`gatednorm.verify.cases`) and the quantized output's
(:mod:`gatednorm.verify.quantized`): by default both, interleaved in proportion
(:func:`gatednorm.verify.cases.interleave`); ``--quant`` runs only the quantized ones, ``--no-quant``
none of them.

Under a time limit: cases run breadth first (:func:`gatednorm.verify.cases.case_order`), so a run
stopped early has covered every backend, dtype, shape and norm kind; ``--max-seconds S`` stops
starting cases after S seconds, and SIGTERM (what ``timeout`` sends) or Ctrl-C stop at once. Either
way the table and --json/--markdown cover the cases that ran, marked incomplete ("complete": false),
and the exit code is 3 (1 if a check failed). While running, --json/--markdown are rewritten as
partial reports every :data:`CHECKPOINT_SECONDS`, in case the process is killed without warning.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from .. import ops
from . import parallel, report, runner
from . import quantized as quant
from .cases import FULL_SHAPES, QUICK_SHAPES, Case, Shape, case_order, case_seed, interleave, shard_jobs, variants
from .interrupt import Terminated, stop_on_sigterm
from .progress import Progress
from .report import EXIT_FAILED, EXIT_USAGE
from .runner import Result, Upstream

#: Seconds between the partial --json/--markdown files written while verify runs.
CHECKPOINT_SECONDS = 60.0

#: The dtypes checked when ``--dtype`` is not given (float64 only on request: it is the reference's own).
DEFAULT_DTYPES = ("float32", "bfloat16", "float16")


#: ``--quant`` / ``--no-quant`` (the ``quant`` option): the quantized cases beside the norm's (default),
#: only them, or none.
QUANT_MODES = ("include", "only", "skip")

#: The options of ``gatednorm verify`` and their defaults, as ``gatednorm.cli`` parses them (a test checks
#: that the two agree); :func:`options` builds a namespace from them for callers without the CLI.
OPTION_DEFAULTS = {
    "device": None, "backend": None, "quick": False, "dtype": None, "gradients": True, "upstream": True,
    "quant": "include", "seed": 0, "json": None, "markdown": None, "verbose": False, "plain": False,
    "progress": True, "progress_every": 10.0, "max_seconds": None, "jobs": 1, "shard": None, "progress_file": None,
}


def options(**overrides) -> argparse.Namespace:
    """The namespace :func:`run` takes: :data:`OPTION_DEFAULTS` with ``overrides`` (``python -m
    gatednorm.verify.quant`` runs verify this way). Unknown names raise ``TypeError``."""
    unknown = sorted(set(overrides) - set(OPTION_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown verify option(s): {', '.join(unknown)}")
    return argparse.Namespace(**{**OPTION_DEFAULTS, **overrides})


class UsageError(Exception):
    """A command line that cannot run (unusable device, unavailable backend, bad --jobs): exit code 2."""


@dataclass
class Plan:
    """What one run covers, resolved from the command line."""

    args: argparse.Namespace  # the options used as given: seed, outputs, display, limits, --jobs
    device: torch.device
    backends: list[str]
    dtypes: tuple[str, ...]
    shapes: tuple[Shape, ...]  # the norm's shapes, then the quantized cases' (QuantShape)
    upstream: Upstream  # the fla-core kernel, or why it is not compared
    cases: list[Case]  # in the order they run (this worker's share with --shard)
    start: float  # time.monotonic() when the run began: --max-seconds and the report's seconds count from here


def default_device() -> str:
    """``cuda`` when available, else ``cpu`` (the device when ``--device`` is not given)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_plan(args: argparse.Namespace, start: float) -> Plan:
    """Resolve ``args`` into a :class:`Plan`; raises :class:`UsageError` for a command line that cannot run."""
    device_text = args.device or default_device()
    try:
        device = torch.device(device_text)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"device {device_text!r} is not usable: {exc}") from exc
    available = runner.available_backends(device)
    # 'compiled' compiles once per feature combination (minutes over the whole matrix): only on request
    backends = args.backend or [b for b in available if b != "compiled"]
    for b in backends:
        if b in available:
            continue
        valid = [name for name in ops.BACKENDS if name != "auto"]
        if b not in valid:
            raise UsageError(f"unknown backend {b!r}; valid backends: {', '.join(valid)}")
        why = ops.backend_problem(b, device) or "it is not available"
        raise UsageError(f"backend {b!r} cannot run on {device}: {why}. Available on {device}: "
                         f"{', '.join(available)}")
    dtypes = tuple(args.dtype or DEFAULT_DTYPES)
    mode = getattr(args, "quant", "include")
    if mode not in QUANT_MODES:
        raise UsageError(f"quant must be one of {QUANT_MODES}, got {mode!r}")
    norm_shapes = () if mode == "only" else (QUICK_SHAPES if args.quick else FULL_SHAPES)
    shapes = (*norm_shapes, *(quant.quant_shapes(args.quick) if mode != "skip" else ()))
    if mode == "only":
        upstream = (None, None, "no upstream quantized kernel is compared (--quant)")
    else:
        upstream = runner.upstream_kernel(device) if args.upstream else (None, None, "disabled (--no-upstream)")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    norm_cases = case_order(backends, norm_shapes, list(variants(dtypes))) if norm_shapes else []
    quant_cases = [] if mode == "skip" else quant.quant_case_order(backends, args.quick, dtypes)
    cases = interleave(norm_cases, quant_cases)
    if args.shard is not None:
        cases = shard_jobs(cases, *args.shard)
    return Plan(args, device, backends, dtypes, shapes, upstream, cases, start)


def run(args: argparse.Namespace) -> int:
    """The ``verify`` command. Returns 0 when every check passes, 1 on any failure, 2 on a usage error,
    3 (:data:`~gatednorm.verify.report.EXIT_INCOMPLETE`) when the run stopped early (--max-seconds,
    SIGTERM, Ctrl-C) without a failure."""
    start = time.monotonic()
    try:
        plan = make_plan(args, start)
    except UsageError as exc:
        print(f"gatednorm verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.shard is None and args.jobs > 1:
        merged = parallel.run_workers(plan)
        code = write_report(plan, merged.done, merged.results, merged.stopped, merged.interrupted, final=True)
        return EXIT_FAILED if merged.crashed else code
    return run_cases(plan)


def run_cases(plan: Plan) -> int:
    """Run the plan's cases one after the other in this process; report and return the exit code.

    Stops starting cases once ``--max-seconds`` have passed, and at once on Ctrl-C or SIGTERM; the
    report then covers the cases that finished and names the one that was interrupted.
    """
    args = plan.args
    progress = Progress(len(plan.cases), bar=args.progress, every=args.progress_every)
    results: list[Result] = []
    stopped = ""  # why the run ended early ("" when every case ran)
    current = ""  # the case that was running when a signal stopped the run
    done = 0
    last_checkpoint = time.monotonic()
    fla = plan.upstream if plan.upstream[0] is not None else None

    with stop_on_sigterm() as sigterm:
        try:
            for b, s, v in plan.cases:
                if args.max_seconds is not None and time.monotonic() - plan.start >= args.max_seconds:
                    stopped = f"--max-seconds {args.max_seconds:g} reached"
                    break
                current = f"{b} {s.name} {v.label()}"
                progress.start_case(current)
                gen = torch.Generator().manual_seed(case_seed(args.seed, s, v))
                results.extend(runner.run_case(b, s, v, plan.device, gen, fla=fla, gradients=args.gradients))
                done += 1
                current = ""
                progress.advance(f"{b} {s.name} {v.label()}")
                if args.progress_file:  # read by the parent of a --jobs worker
                    report.write_atomic(args.progress_file, f"{done} {len(plan.cases)}")
                if (args.json or args.markdown) and time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                    # a run killed without a chance to report (SIGKILL, a hung call) still leaves this
                    write_report(plan, done, results, stopped, current, final=False)
                    last_checkpoint = time.monotonic()
        except (KeyboardInterrupt, Terminated) as exc:
            stopped = "SIGTERM" if isinstance(exc, Terminated) else "KeyboardInterrupt"
        finally:
            sigterm.armed = False
            progress.close()
        return write_report(plan, done, results, stopped, current, final=True)


def write_report(plan: Plan, done: int, results: list[Result], stopped: str, current: str, final: bool) -> int:
    """Summarise what ran; print the table (``final``) and write --json/--markdown; return the exit code.

    ``stopped`` says why the run ended early ("" if it did not), ``current`` names the interrupted case.
    """
    args = plan.args
    summary = report.summarize(results)
    meta = report.build_meta(plan.device, plan.backends, plan.upstream, plan.shapes, len(plan.cases), done, results,
                             stopped, current, time.monotonic() - plan.start)
    if final:
        report.print_report(summary, results, meta, use_rich=not args.plain, verbose=args.verbose)
    if args.json:
        report.write_atomic(args.json, report.json_report(summary, results, meta))
    if args.markdown:
        report.write_atomic(args.markdown, report.markdown(summary, results, meta))
    return report.exit_code(meta)

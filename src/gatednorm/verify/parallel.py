"""``gatednorm verify --jobs N``: the cases in N worker processes, their reports merged into one.

Each worker is ``gatednorm verify --shard K/N`` with the parent's selection: it runs its share of
the cases (:func:`gatednorm.verify.cases.shard_jobs`), writes "done total" to a progress file after
each case and its JSON report at the end. The reports are read back as
:class:`~gatednorm.verify.runner.Result` rows, so the table, --json and --markdown are the same as
a single-process run's (same data: every case draws from its own seed). SIGTERM/Ctrl-C are passed
on to the workers, which report what ran; a worker that dies without a report makes the run fail
(exit 1) and its log is printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .interrupt import Terminated, stop_on_sigterm
from .progress import Progress
from .report import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, load_json_report
from .runner import Result

if TYPE_CHECKING:
    from .session import Plan

#: Seconds a worker gets to write its report after the parent passed on SIGTERM, before it is killed.
WORKER_STOP_SECONDS = 120


@dataclass
class Merged:
    """The workers' reports, merged."""

    results: list[Result]
    done: int  # cases run, over all workers
    stopped: str  # why the run ended early ("" if it did not): the workers' reasons, a signal, crashes
    interrupted: str  # the cases that signals interrupted ("" if none)
    crashed: list[int]  # workers that died (their logs were printed to stderr)


def worker_command(plan: Plan, shard: int, shards: int, json_path: str, progress_path: str,
                   max_seconds: float | None) -> list[str]:
    """The ``verify`` command line of one ``--jobs`` worker: the parent's selection, one shard of it."""
    args = plan.args
    cmd = [sys.executable, "-m", "gatednorm", "verify", "--device", str(plan.device), "--seed", str(args.seed),
           "--shard", f"{shard}/{shards}", "--json", json_path, "--progress-file", progress_path,
           "--no-progress", "--progress-every", "0", "--plain"]
    for b in plan.backends:
        cmd += ["--backend", b]
    for d in plan.dtypes:
        cmd += ["--dtype", d]
    if args.quick:
        cmd.append("--quick")
    if not args.gradients:
        cmd.append("--no-grad")
    if not args.upstream:
        cmd.append("--no-upstream")
    mode = getattr(args, "quant", "include")
    if mode != "include":
        cmd.append("--quant" if mode == "only" else "--no-quant")
    if max_seconds is not None:
        cmd += ["--max-seconds", f"{max(max_seconds, 0.0):.1f}"]
    return cmd


def _read_done(path: str) -> int:
    """The cases a worker has finished, from its progress file (0 before it wrote one)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def run_workers(plan: Plan) -> Merged:
    """Run the plan's cases in ``--jobs`` worker processes, wait for them (passing on a stop) and merge."""
    args = plan.args
    shards = min(args.jobs, len(plan.cases)) or 1
    threads = max(1, (os.cpu_count() or 1) // shards)
    tmp = tempfile.mkdtemp(prefix="gatednorm-verify-")
    paths = [(os.path.join(tmp, f"{k}.json"), os.path.join(tmp, f"{k}.progress"), os.path.join(tmp, f"{k}.log"))
             for k in range(shards)]
    remaining = None if args.max_seconds is None else args.max_seconds - (time.monotonic() - plan.start)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    progress = Progress(len(plan.cases), bar=args.progress, every=args.progress_every)
    progress.current = f"{shards} workers"
    procs: list[subprocess.Popen] = []
    stopped = ""
    with stop_on_sigterm() as sigterm:
        try:
            for k, (json_path, progress_path, log_path) in enumerate(paths):
                with open(log_path, "w") as log:
                    procs.append(subprocess.Popen(
                        worker_command(plan, k, shards, json_path, progress_path, remaining),
                        stdout=log, stderr=subprocess.STDOUT, env=env))
            while any(p.poll() is None for p in procs):
                time.sleep(0.5)
                progress.set_done(sum(_read_done(pp) for _, pp, _ in paths), f"{shards} workers")
                progress.current = f"{sum(p.poll() is None for p in procs)} of {shards} workers running"
        except (KeyboardInterrupt, Terminated) as exc:
            stopped = "SIGTERM" if isinstance(exc, Terminated) else "KeyboardInterrupt"
        finally:
            sigterm.armed = False
            for p in procs:  # let every worker stop and write its report (a no-op for finished ones)
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=WORKER_STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            progress.close()

    results: list[Result] = []
    done, reasons, interrupted, crashed = 0, set(), [], []
    for k, ((json_path, _, log_path), p) in enumerate(zip(paths, procs, strict=False)):
        try:
            worker_report = load_json_report(json_path)
        except (OSError, ValueError):
            worker_report = None
        # a worker we stopped may die of the signal after writing its report (its handler is gone by then)
        if worker_report is None or (p.returncode not in (EXIT_OK, EXIT_FAILED, EXIT_INCOMPLETE) and not stopped):
            with open(log_path) as f:
                tail = f.read()[-3000:]
            crashed.append(k)
            print(f"gatednorm verify: worker {k}/{shards} exited with code {p.returncode}"
                  f"{'' if worker_report else ' without a report'}; its log ends:\n{tail}", file=sys.stderr)
        if worker_report is not None:
            meta = worker_report["meta"]
            results.extend(Result.from_dict(r) for r in worker_report["results"])
            done += meta["cases_run"]
            if meta.get("stopped"):
                reasons.add(meta["stopped"])
            if meta.get("interrupted_case"):
                interrupted.append(meta["interrupted_case"])
    if crashed:
        reasons.add(f"worker(s) {crashed} crashed")
    if stopped:
        reasons.add(stopped)
    if not crashed:  # a crashed worker's files stay for a closer look
        for path in (q for triple in paths for q in triple):
            with contextlib.suppress(OSError):
                os.remove(path)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)
    return Merged(results, done, "; ".join(sorted(reasons)), "; ".join(interrupted), crashed)

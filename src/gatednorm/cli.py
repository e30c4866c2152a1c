"""The ``gatednorm`` command (also ``python -m gatednorm``): argument parsing only.

Subcommands are registered by :func:`build_parser`; each ``add_*_parser`` function adds one
subparser and sets ``func`` (called with the parsed namespace, returns the exit code). The work is
done elsewhere, imported when a subcommand runs, so that ``--help`` and the hook commands stay cheap:

* ``verify``: the precision report, :func:`gatednorm.verify.session.run`;
* ``info``: versions and which backend a call gets per device, :func:`gatednorm.diagnostics.info`;
* ``install-hook`` / ``uninstall-hook``: :func:`gatednorm.integrations.hook.main`.

``gatednorm`` alone prints the help and exits 0; ``gatednorm --version`` prints the version.
"""

from __future__ import annotations

import argparse
import sys

# The names of gatednorm.verify.cases.DTYPES and the value of gatednorm.verify.report.EXIT_INCOMPLETE,
# spelled out so that building the parser does not import the verify package (tests check they agree).
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "float64")
EXIT_INCOMPLETE = 3
#: Exit code when stdout's reader closed the pipe early: 128 + SIGPIPE, what a shell reports for a command
#: that SIGPIPE ended (Python ignores SIGPIPE and gets BrokenPipeError instead).
EXIT_BROKEN_PIPE = 141


def add_verify_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``verify``: every available backend over the variant matrix against float64, torch and upstream."""
    p = sub.add_parser("verify", help="check every backend against float64, PyTorch's norms and upstream",
                       description="Precision report: every available backend over the variant matrix, "
                                   "against float64, F.layer_norm/F.group_norm/F.rms_norm and the upstream "
                                   "Triton kernel (fla-core) when installed, and the quantized output "
                                   "(gated_norm_quant) against float64. Exit code 1 on any failure.")
    # default None: resolved when the command runs, so that building the parser does not initialise CUDA
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    # no argparse choices: the registry in gatednorm.ops is extensible; verify names the valid backends
    p.add_argument("--backend", action="append", default=None,
                   help="only this backend: native, triton or compiled (repeatable; default: every backend "
                        "available on the device except 'compiled', which compiles per feature combination)")
    p.add_argument("--quick", action="store_true", help="a small set of shapes (CI)")
    p.add_argument("--dtype", action="append", choices=list(DTYPE_CHOICES), default=None,
                   help="only this dtype (repeatable; default float32, bfloat16, float16)")
    p.add_argument("--no-grad", dest="gradients", action="store_false", help="skip the gradient checks")
    p.add_argument("--no-upstream", dest="upstream", action="store_false",
                   help="skip the comparison with the upstream (fla-core) kernel")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--quant", dest="quant", action="store_const", const="only", default="include",
                       help="only the quantized-output cases (gated_norm_quant to fp8/int8: scale and q against "
                            "float64). By default they run with the norm's cases")
    quant.add_argument("--no-quant", dest="quant", action="store_const", const="skip",
                       help="skip the quantized-output cases")
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
    p.set_defaults(func=run_verify)
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


def run_verify(args: argparse.Namespace) -> int:
    """Run ``verify`` (see :func:`gatednorm.verify.session.run` for the exit codes)."""
    from .verify import session

    return session.run(args)


def add_info_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``info``: versions, settings, and per device which backend ``auto`` and a plain call pick, and why."""
    p = sub.add_parser("info", help="versions, and which backend a call gets on each device and why",
                       description="What this installation runs: gatednorm, Python, torch and Triton versions, "
                                   "the environment settings that steer dispatch, and for the CPU and every "
                                   "accelerator which backend 'auto' and a call without backend= pick, and why "
                                   "(gatednorm.info() returns the same as a dict).")
    p.add_argument("--json", action="store_true", help="print the dict of gatednorm.info() as JSON")
    p.set_defaults(func=run_info)
    return p


def run_info(args: argparse.Namespace) -> int:
    """Print :func:`gatednorm.diagnostics.info` as text (or JSON with ``--json``)."""
    import json

    from .diagnostics import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def add_hook_parsers(sub: argparse._SubParsersAction) -> None:
    """``install-hook`` / ``uninstall-hook``: the opt-in .pth file that applies GATEDNORM_PATCH at start-up."""

    def run(args: argparse.Namespace) -> int:
        from .integrations.hook import main as hook_main

        return hook_main(args.command, args.site_dir)

    for name, verb in (("install-hook", "install"), ("uninstall-hook", "remove")):
        h = sub.add_parser(name, help=f"{verb} the opt-in .pth hook that applies GATEDNORM_PATCH at interpreter start")
        h.add_argument("--site-dir", default=None, help="directory for the .pth file (default: site-packages)")
        h.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """The ``gatednorm`` parser; add a subcommand with one ``add_<name>_parser(sub)`` call here."""
    from ._version import __version__  # a constant: no torch import

    parser = argparse.ArgumentParser(prog="gatednorm", description="gated, grouped LayerNorm/RMSNorm tools")
    parser.add_argument("--version", action="version", version=f"gatednorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_verify_parser(sub)
    add_info_parser(sub)
    add_hook_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv) and run the subcommand; returns its exit code.

    Without a subcommand the help is printed and the exit code is 0. When the reader of stdout goes away
    early (``gatednorm info | head -1``) the command stops quietly, without a traceback, and the exit code
    is :data:`EXIT_BROKEN_PIPE` (``verify`` reports that case itself and keeps its verdict and files).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            parser.print_help()
            code = 0
        else:
            code = args.func(args)
        sys.stdout.flush()  # output that fit in the buffer meets the closed pipe here, not at interpreter exit
    except BrokenPipeError:
        from ._platform import quiet_closed_stdout

        quiet_closed_stdout()
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())

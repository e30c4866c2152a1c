"""``python -m gatednorm.verify.quant``: the quantized cases of ``gatednorm verify`` on their own.

The same as ``gatednorm verify --quant`` with the options below (the verify table, exit codes and
--json/--markdown reports). The reference, the judgement and the cases live in
:mod:`gatednorm.verify.quantized`; this module re-exports its names (the module path tests and docs
name)::

    python -m gatednorm.verify.quant [--device cuda] [--backend triton] [--quick]
"""

from __future__ import annotations

import argparse
import sys

from .quantized import *  # noqa: F403 (re-exported: the names of gatednorm.verify.quantized)
from .quantized import __all__  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """``gatednorm verify --quant`` with this module's options; returns verify's exit code."""
    from . import session

    p = argparse.ArgumentParser(prog="python -m gatednorm.verify.quant",
                                description="The quantized cases of gatednorm verify (the same as "
                                            "`gatednorm verify --quant`): gated_norm_quant against float64.")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", action="append", default=None,
                   help="only this backend (repeatable; default: every backend available on the device "
                        "except 'compiled')")
    p.add_argument("--quick", action="store_true", help="a small set of shapes")
    p.add_argument("--dtype", action="append", default=None, choices=("float32", "bfloat16", "float16", "float64"),
                   help="only this input dtype (repeatable; default float32, bfloat16, float16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the verify --json report")
    p.add_argument("--markdown", metavar="PATH", help="write the verify --markdown report")
    p.add_argument("--verbose", "-v", action="store_true", help="print every failing case")
    args = p.parse_args(argv)
    return session.run(session.options(quant="only", upstream=False, gradients=False, **vars(args)))


if __name__ == "__main__":
    sys.exit(main())

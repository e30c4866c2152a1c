"""``gatednorm verify``: every backend against float64, PyTorch's norms and the upstream kernel.

One module per job:

* :mod:`~gatednorm.verify.cases`: the case matrix (shapes x variants), its order, sharding and data;
* :mod:`~gatednorm.verify.quantized`: the quantized-output cases (``gated_norm_quant``), their float64
  reference and judgement (``python -m gatednorm.verify.quant`` runs only them);
* :mod:`~gatednorm.verify.tolerance`: the error model, i.e. how far a result may be from float64;
* :mod:`~gatednorm.verify.runner`: running one case and comparing it with every reference;
* :mod:`~gatednorm.verify.report`: the summary table, the JSON/Markdown reports, the exit code;
* :mod:`~gatednorm.verify.session`: one run from the command line to the exit code (time limits,
  signals, checkpoints), with :mod:`~gatednorm.verify.parallel` (``--jobs``),
  :mod:`~gatednorm.verify.progress` and :mod:`~gatednorm.verify.interrupt` (SIGTERM).
"""

from .cases import (
    ACTIVATIONS,
    DTYPES,
    EPS,
    FULL_SHAPES,
    GATES,
    QUICK_SHAPES,
    Case,
    Inputs,
    Shape,
    Variant,
    breadth_first,
    case_applies,
    case_order,
    case_seed,
    interleave,
    make_inputs,
    shard_jobs,
    variants,
)
from .quantized import (
    QUANT_QUANTITIES,
    QUANT_RULE,
    QuantJudgement,
    QuantShape,
    QuantVariant,
    check_quant,
    judge_quant,
    quant_case_order,
)
from .report import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    SCHEMA_VERSION,
    SummaryRow,
    load_json_report,
    summarize,
    upgrade_json_report,
)
from .runner import (
    QUANTITIES,
    Result,
    available_backends,
    reference_results,
    run_case,
    torch_reference,
    torch_reference_name,
    upstream_kernel,
)
from .session import run
from .tolerance import (
    BASE_K,
    TOLERANCE_DOC,
    Comparison,
    allowed_error,
    compare,
    k_factor,
    magnitudes,
    min_spacing,
    tolerance_table,
    ulp_of,
    unit_roundoff,
)

__all__ = [
    "ACTIVATIONS",
    "BASE_K",
    "DTYPES",
    "EPS",
    "EXIT_FAILED",
    "EXIT_INCOMPLETE",
    "EXIT_OK",
    "EXIT_USAGE",
    "FULL_SHAPES",
    "GATES",
    "QUANTITIES",
    "QUANT_QUANTITIES",
    "QUANT_RULE",
    "QUICK_SHAPES",
    "SCHEMA_VERSION",
    "TOLERANCE_DOC",
    "Case",
    "Comparison",
    "Inputs",
    "QuantJudgement",
    "QuantShape",
    "QuantVariant",
    "Result",
    "Shape",
    "SummaryRow",
    "Variant",
    "allowed_error",
    "available_backends",
    "breadth_first",
    "case_applies",
    "case_order",
    "case_seed",
    "check_quant",
    "compare",
    "interleave",
    "judge_quant",
    "k_factor",
    "load_json_report",
    "magnitudes",
    "make_inputs",
    "min_spacing",
    "quant_case_order",
    "reference_results",
    "run",
    "run_case",
    "shard_jobs",
    "summarize",
    "tolerance_table",
    "torch_reference",
    "torch_reference_name",
    "ulp_of",
    "unit_roundoff",
    "upgrade_json_report",
    "upstream_kernel",
    "variants",
]

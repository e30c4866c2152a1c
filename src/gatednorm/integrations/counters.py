"""Call counting for the replacements: the proof that a patch took effect.

Every replacement calls :func:`hit` once per call, which resolves the backend the call runs on
and counts it under ``"label@backend"``; :func:`call_counts` reads the counts and
:func:`reset_call_counts` clears them. This module depends on nothing else in
``gatednorm.integrations``, so the bookkeeping (``_core``) and the replacement builders
(``_wrappers`` and the target modules) can both use it without importing each other.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..ops import resolve_backend

# Calls that went through a replacement, keyed "label@backend".
_CALLS: Counter = Counter()


def hit(label: str, backend: str | None, device: torch.device) -> str:
    """Count one call through the replacement ``label`` and return the backend it resolves to."""
    name = resolve_backend(backend, device)
    _CALLS[f"{label}@{name}"] += 1
    return name


def call_counts() -> dict[str, int]:
    """How many calls went through each replacement since the last reset: ``{"label@backend": n}``."""
    return dict(_CALLS)


def reset_call_counts() -> None:
    """Forget every counted call."""
    _CALLS.clear()

"""Our measured metrics of the registered models (``zoo/data/measured.json``, written by
``benchmarks/report.py``): per name, the shipped weights' own figures and the method's mean
over training seeds. Imports nothing else of ``zoo``, so cards and the registry both read it."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

MEASURED_PATH = Path(__file__).parent / "data" / "measured.json"


@cache
def measured_metrics() -> dict[str, Any]:
    """Registry name -> ``{"shipped": ..., "over_seeds": ...}`` ({} when not measured)."""
    return json.loads(MEASURED_PATH.read_text()) if MEASURED_PATH.is_file() else {}

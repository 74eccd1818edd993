"""Where the benchmarks write their figures: ``docs/results/<benchmark>.json``, beside the
tables of ``docs/`` they feed (a table in the docs names the JSON it was made from)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from particleseg_model.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "docs" / "results"


def write_results(
    path: Path, benchmark: str, args: dict[str, Any], figures: dict[str, Any]
) -> Path:
    """Write one run's figures as JSON (atomically): the benchmark's name, when and where it
    ran (UTC ISO 8601; host CPU count), its arguments and ``figures`` (units in the key names:
    ``_s`` seconds, ``_per_s`` items per second, ``_mb`` MiB)."""
    record = {
        "benchmark": benchmark,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": args,
        "figures": figures,
    }
    return atomic_write_json(path, record)

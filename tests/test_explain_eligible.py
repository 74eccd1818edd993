"""The eligible count explained: by origin, the others by reason, not-fetchable ones named."""

import pandas as pd

from particleseg_model.access.catalog import select_eligible
from particleseg_model.cli import explain_eligible


def _row(
    empiar_id: str,
    title: str,
    resolution: float | None,
    *,
    status: str = "REL",
    particles: bool = True,
    reason: str = "",
    error: str = "",
) -> dict:
    return {
        "empiar_id": empiar_id,
        "title": title,
        "status": status,
        "best_resolution_a": resolution,
        "ships_particles": particles,
        "ships_coordinates": False,
        "not_fetchable_reason": reason,
        "error": error,
        "partition_key": empiar_id.split("-")[1],
    }


def test_every_entry_is_accounted_for() -> None:
    catalog = pd.DataFrame(
        [
            _row("EMPIAR-10028", "Plasmodium ribosome", 3.2),
            _row("EMPIAR-10029", "real, coarse", 4.5),
            _row("EMPIAR-19001", "[fixture] obsolete", 3.0, status="OBSOLETE"),
            _row(
                "EMPIAR-19013", "[fixture] text only", 3.0, particles=False, reason="free text only"
            ),
            _row("EMPIAR-30001", "[simulated] EMD-1832", 3.2),
        ]
    )
    eligible = select_eligible(catalog, 3.5)
    lines = explain_eligible(catalog, eligible)
    assert lines[0] == "eligible: 2 of 5 (1 real, 0 synthetic fixture, 1 simulated)"
    assert lines[1] == (
        "not eligible: 1 obsolete, 1 no fetchable particle set, "
        "1 map not better than the limit (or none)"
    )
    assert lines[2:] == ["  EMPIAR-19013: free text only"]

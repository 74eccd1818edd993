"""Cleaning a user's particle set: segment every particle, score it (ETS or calibrated) and write
the kept particles back as a STAR file."""

from __future__ import annotations

from particleseg_model.cleaning.clean import (
    DEFAULT_DROP,
    SCORES,
    CleanResult,
    clean_star,
    score_particles,
    select_particles,
)
from particleseg_model.cleaning.segment import (
    SegmentResult,
    read_labels,
    segment_star,
)

__all__ = [
    "CleanResult",
    "DEFAULT_DROP",
    "SCORES",
    "SegmentResult",
    "clean_star",
    "read_labels",
    "score_particles",
    "segment_star",
    "select_particles",
]

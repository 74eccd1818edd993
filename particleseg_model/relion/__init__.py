"""RELION's programs run as subprocesses: one runner (logs streamed, errors as RelionError),
particle extraction and 3D auto-refinement."""

from __future__ import annotations

from particleseg_model.relion.extract import (
    Extraction,
    extract_particles,
)
from particleseg_model.relion.refine import (
    REFINE_DEFAULTS,
    ReferenceGeometry,
    Refinement,
    auto_refine,
    default_ini_lowpass_a,
    pose_errors,
    reconstruct,
    reference_geometry,
    summarise_pose_errors,
)
from particleseg_model.relion.runner import (
    MPI_PREFIX,
    RelionError,
    RelionRun,
    relion_available,
    relion_error_text,
    run_relion,
)

__all__ = [
    "Extraction",
    "MPI_PREFIX",
    "REFINE_DEFAULTS",
    "ReferenceGeometry",
    "Refinement",
    "RelionError",
    "RelionRun",
    "auto_refine",
    "default_ini_lowpass_a",
    "extract_particles",
    "pose_errors",
    "reconstruct",
    "reference_geometry",
    "relion_available",
    "relion_error_text",
    "run_relion",
    "summarise_pose_errors",
]

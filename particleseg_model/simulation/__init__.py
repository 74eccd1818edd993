"""Simulated particles and micrographs with ground truth, and the demo archive built from them."""

from __future__ import annotations

from particleseg_model.simulation.demo_archive import (
    FIRST_EMD_NUMBER,
    FIRST_ENTRY_NUMBER,
    NOMINAL_RESOLUTION_A,
    ArchiveExistsError,
    MapSource,
    default_maps,
    find_shared_data,
    write_demo_archive,
    write_png,
    write_star,
)
from particleseg_model.simulation.simulate import (
    JUNK_KINDS,
    FourierProjector,
    SimulatedMicrographs,
    SimulatedParticles,
    SimulationConfig,
    ctf_2d,
    electron_wavelength_a,
    euler_matrices,
    normalise_images,
    place,
    random_euler,
    simulate_micrographs,
    simulate_particles,
)

__all__ = [
    "ArchiveExistsError",
    "FIRST_EMD_NUMBER",
    "FIRST_ENTRY_NUMBER",
    "FourierProjector",
    "JUNK_KINDS",
    "MapSource",
    "NOMINAL_RESOLUTION_A",
    "SimulatedMicrographs",
    "SimulatedParticles",
    "SimulationConfig",
    "ctf_2d",
    "default_maps",
    "electron_wavelength_a",
    "euler_matrices",
    "find_shared_data",
    "normalise_images",
    "place",
    "random_euler",
    "simulate_micrographs",
    "simulate_particles",
    "write_demo_archive",
    "write_png",
    "write_star",
]

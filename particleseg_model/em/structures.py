"""Density maps from real atomic models (PDB / mmCIF), alone or as symmetric assemblies.

A cryo-EM training corpus needs many particle shapes, and a real atomic model is the nearest
thing to a real particle that can be simulated: its domains, grooves and secondary structure are
those of a protein, not of a generator's ellipsoids. :func:`read_atoms` reads a model with
``gemmi`` (an optional dependency: ``pip install gemmi``, the ``pretrained`` extra), water,
ligands and hydrogens left out; :func:`assemble` places copies of one model with a point-group
symmetry (``C<n>``, ``D<n>``, ``T``, ``O``), as cryo-EM targets so often are (rings, barrels,
cages); :func:`structure_map` computes the map.

Conventions: coordinates in Angstrom as ``(n, 3)`` x, y, z; the map is float32 ``[z, y, x]``
with its centre at voxel ``box // 2`` (:mod:`particleseg_model.em.maps`). Each atom is a
Gaussian of weight its atomic number (the electron-scattering potential at the resolution of a
few Angstrom is, to a few percent, proportional to it) and width from the B-factor.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from particleseg_model.em.maps import DensityMap, MapError, atoms_map

__all__ = ["Atoms", "SYMMETRIES", "assemble", "read_atoms", "structure_map", "symmetry_rotations"]

SYMMETRIES = "C<n> (n >= 1), D<n> (n >= 2), T, O"
_SYMMETRY = re.compile(r"^(?:([CD])(\d+)|(T)|(O))$")
# centres of neighbouring copies this many monomer radii (the radius of the sphere of the same
# radius of gyration) apart: proteins in an assembly pack their surfaces into each other, so a
# little less than touching spheres (2.0)
_CONTACT_RADII = 1.7


@dataclass(frozen=True)
class Atoms:
    """Atoms of a model: ``xyz`` (n, 3) Angstrom, ``z`` (n,) atomic numbers, ``source``."""

    xyz: np.ndarray
    z: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.z)

    @property
    def radius_a(self) -> float:
        """Largest distance of an atom from the centre of the atoms (Angstrom)."""
        centre = self.xyz.mean(axis=0)
        return float(np.sqrt(((self.xyz - centre) ** 2).sum(axis=1)).max())

    @property
    def sphere_radius_a(self) -> float:
        """Radius of the uniform sphere with the atoms' radius of gyration, ``sqrt(5/3) Rg``
        (Angstrom): the size of the model as a packed body, which an outlying loop does not
        inflate as it does :attr:`radius_a`."""
        centre = self.xyz.mean(axis=0)
        return float(np.sqrt(5 / 3 * ((self.xyz - centre) ** 2).sum(axis=1).mean()))


def _text(path: Path) -> str:
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix)
    if opener is None:
        return path.read_text()
    with opener(path, "rt") as fh:
        return fh.read()


def read_atoms(path: str | os.PathLike, *, min_atoms: int = 100) -> Atoms:
    """The protein and nucleic-acid atoms of the first model in a PDB or mmCIF file.

    Parameters
    ----------
    path
        ``.pdb``, ``.ent``, ``.cif`` or ``.mmcif``, optionally ``.gz`` or ``.bz2`` compressed.
    min_atoms
        Fewer non-hydrogen polymer atoms than this is refused (a ligand file, a fragment).

    Returns
    -------
    Atoms

    Raises
    ------
    MapError
        The file cannot be read, holds no model, or too few atoms (the file named).
    ModuleNotFoundError
        gemmi is not installed.
    """
    try:
        import gemmi
    except ModuleNotFoundError as exc:  # an optional dependency: say how to get it
        raise ModuleNotFoundError(
            "reading atomic models needs gemmi: pip install gemmi (or the 'pretrained' extra)"
        ) from exc
    file = Path(path)
    try:
        text = _text(file)
        stem = file.name.removesuffix(file.suffix) if file.suffix in (".gz", ".bz2") else file.name
        if stem.endswith((".cif", ".mmcif")):
            structure = gemmi.make_structure_from_block(gemmi.cif.read_string(text)[0])
        else:
            structure = gemmi.read_pdb_string(text)
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise MapError(f"{file}: cannot read the atomic model ({exc})") from exc
    if len(structure) == 0:
        raise MapError(f"{file}: holds no model")
    structure.setup_entities()
    structure.remove_ligands_and_waters()
    structure.remove_hydrogens()
    xyz, z = [], []
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                z.append(atom.element.atomic_number)
    if len(z) < min_atoms:
        raise MapError(f"{file}: {len(z)} polymer atoms, fewer than {min_atoms}")
    return Atoms(np.asarray(xyz, np.float64), np.asarray(z, np.int64), file.name)


def _close(generators: list[np.ndarray]) -> list[np.ndarray]:
    """Every product of the generators (a finite rotation group), identity first."""
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        fresh = []
        for g in frontier:
            for h in generators:
                product = h @ g
                if not any(np.allclose(product, k, atol=1e-6) for k in group):
                    group.append(product)
                    fresh.append(product)
        frontier = fresh
    return group


def _about(axis: np.ndarray | list[float], angle: float) -> np.ndarray:
    """Rotation by ``angle`` (radians) about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, np.float64)
    k = k / np.linalg.norm(k)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def symmetry_rotations(symmetry: str) -> list[np.ndarray]:
    """The rotation matrices of a point group (identity first).

    Parameters
    ----------
    symmetry
        ``C<n>`` (n-fold axis along z), ``D<n>`` (that and 2-fold axes along x), ``T``
        (tetrahedral, 12) or ``O`` (octahedral, 24), RELION's names.

    Returns
    -------
    list of numpy.ndarray
        ``(3, 3)`` rotations, as many as the group's order.
    """
    match = _SYMMETRY.match(symmetry.strip().upper())
    if not match or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(f"unknown symmetry {symmetry!r}: {SYMMETRIES}")
    kind, order = match.group(1), int(match.group(2) or 0)
    if kind == "C":
        return [_about([0, 0, 1], 2 * math.pi * k / order) for k in range(order)]
    if kind == "D":
        if order < 2:
            raise ValueError(f"unknown symmetry {symmetry!r}: {SYMMETRIES}")
        ring = [_about([0, 0, 1], 2 * math.pi * k / order) for k in range(order)]
        flip = _about([1, 0, 0], math.pi)
        return ring + [flip @ r for r in ring]
    three = _about([1, 1, 1], 2 * math.pi / 3)
    if match.group(3):  # T
        return _close([_about([0, 0, 1], math.pi), three])
    return _close([_about([0, 0, 1], math.pi / 2), three])  # O


def assemble(
    atoms: Atoms, symmetry: str, rng: np.random.Generator, *, contact_radii: float = _CONTACT_RADII
) -> Atoms:
    """Copies of ``atoms`` arranged with a point-group symmetry.

    The model is turned by a random rotation (so every assembly of one model differs), centred,
    and placed along a generic direction at the radius where neighbouring copies' centres are
    ``contact_radii`` monomer radii (:attr:`Atoms.sphere_radius_a`) apart (close packing, a
    little interpenetration), then every
    rotation of the group is applied. ``C1`` returns the model centred.

    Parameters
    ----------
    atoms
        The monomer.
    symmetry
        As :func:`symmetry_rotations`.
    rng
        Draws the monomer's orientation.
    contact_radii
        Distance between neighbouring copies' centres, in monomer radii.

    Returns
    -------
    Atoms
        ``len(group) * len(atoms)`` atoms, centred on 0; ``source`` names model and symmetry.
    """
    rotations = symmetry_rotations(symmetry)
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    xyz = (atoms.xyz - atoms.xyz.mean(axis=0)) @ q.T
    source = f"{atoms.source}:{symmetry.upper()}"
    if len(rotations) == 1:
        return Atoms(xyz, atoms.z, source)
    # a direction on no symmetry axis; for C and D mostly sideways, so copies form a ring
    direction = np.array([1.0, 0.25, 0.35] if symmetry.upper()[0] in "CD" else [0.9, 0.3, 0.5])
    direction /= np.linalg.norm(direction)
    gaps = [np.linalg.norm(g @ direction - direction) for g in rotations[1:]]
    radius = contact_radii * atoms.sphere_radius_a / max(min(gaps), 1e-6)
    placed = xyz + radius * direction
    copies = np.concatenate([placed @ g.T for g in rotations])
    z = np.tile(atoms.z, len(rotations))
    return Atoms(copies - copies.mean(axis=0), z, source)


def structure_map(
    atoms: Atoms,
    box: int,
    *,
    fill: float = 0.55,
    pixel_size_a: float | None = None,
    b_factor: float = 60.0,
) -> DensityMap:
    """The map of a model: each atom a Gaussian weighted by its atomic number.

    Parameters
    ----------
    atoms
        The model (e.g. from :func:`assemble`).
    box
        Map box (voxels).
    fill
        With ``pixel_size_a`` None: the voxel size at which the model's diameter spans this
        fraction of the box.
    pixel_size_a
        Voxel size (Angstrom); None: from ``fill``.
    b_factor
        Atomic B-factor (A^2); the Gaussian's sigma is ``sqrt(B / 8) / pi`` A, at least 0.9
        voxel so that the map is not aliased.

    Returns
    -------
    DensityMap
        ``volume_a3`` is the protein volume of the atoms (18 A^3 a non-hydrogen atom), for the
        contour level.
    """
    if not 0.1 <= fill <= 0.95:
        raise ValueError(f"fill {fill} outside [0.1, 0.95]")
    xyz = atoms.xyz - atoms.xyz.mean(axis=0)
    extent = 2 * atoms.radius_a + 8.0  # diameter plus an atom's reach, A
    pixel = pixel_size_a if pixel_size_a is not None else extent / (fill * box)
    return atoms_map(
        xyz, box, pixel, weights=atoms.z.astype(np.float64), b_factor=b_factor, source=atoms.source
    )

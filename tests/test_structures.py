"""Maps from atomic models, alone or as symmetric assemblies (em.structures, issue 15 item 2)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from particleseg_model.em.maps import MapError, map_threshold, particle_diameter_px
from particleseg_model.em.structures import (
    Atoms,
    assemble,
    read_atoms,
    structure_map,
    symmetry_rotations,
)


def helix_atoms(residues: int = 60) -> Atoms:
    """An alpha helix (N, CA, C, O per residue; 1.5 A rise, 100 degrees a residue)."""
    t = np.arange(residues)
    xyz, z = [], []
    for radius, phase, element in ((1.6, -0.4, 7), (2.3, 0.0, 6), (1.7, 0.4, 6), (2.9, 0.8, 8)):
        angle = np.radians(100 * t) + phase
        xyz.append(np.stack([radius * np.cos(angle), radius * np.sin(angle), 1.5 * t], 1))
        z.append(np.full(residues, element))
    return Atoms(np.concatenate(xyz), np.concatenate(z), "helix")


def write_pdb(path: Path, atoms: Atoms) -> None:
    names = {6: ("CA", "C"), 7: ("N", "N"), 8: ("O", "O")}
    lines = []
    for i, ((x, y, zc), zz) in enumerate(zip(atoms.xyz, atoms.z, strict=True)):
        name, element = names[int(zz)]
        lines.append(
            f"ATOM  {i + 1:5d}  {name:<3} ALA A{i // 4 + 1:4d}    "
            f"{x:8.3f}{y:8.3f}{zc:8.3f}  1.00 20.00          {element:>2}"
        )
    lines.append("HETATM99999  O   HOH W   1       0.000   0.000   0.000  1.00 20.00           O")
    text = "\n".join(lines + ["END", ""])
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


@pytest.mark.parametrize(
    ("symmetry", "order"), [("C1", 1), ("C7", 7), ("D4", 8), ("T", 12), ("O", 24)]
)
def test_point_groups_are_closed_groups_of_rotations(symmetry: str, order: int):
    group = symmetry_rotations(symmetry)
    assert len(group) == order and np.allclose(group[0], np.eye(3))
    for g in group:
        assert np.allclose(g @ g.T, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(g), 1)
    for g in group:  # closed: every product is in the group
        for h in group:
            assert any(np.allclose(g @ h, k, atol=1e-6) for k in group)


def test_unknown_symmetry_is_refused():
    for bad in ("I", "C0", "D1", "X3", ""):
        with pytest.raises(ValueError, match="unknown symmetry"):
            symmetry_rotations(bad)


def test_assembly_is_symmetric_centred_and_packed():
    monomer = helix_atoms()
    rng = np.random.default_rng(0)
    ring = assemble(monomer, "C6", rng)
    assert len(ring) == 6 * len(monomer) and ring.source == "helix:C6"
    assert np.allclose(ring.xyz.mean(axis=0), 0, atol=1e-6)
    # the C6 rotation about z maps the assembly onto itself
    turned = ring.xyz @ symmetry_rotations("C6")[1].T
    distance = np.sqrt(((turned[:, None, :] - ring.xyz[None, ::7, :]) ** 2).sum(-1)).min(0)
    assert distance.max() < 1e-6
    # copies are packed: neighbouring centres 1.7 monomer radii apart
    centres = ring.xyz.reshape(6, -1, 3).mean(axis=1)
    gaps = np.linalg.norm(centres - centres[0], axis=1)[1:]
    assert np.isclose(gaps.min(), 1.7 * monomer.sphere_radius_a, rtol=1e-6)
    cage = assemble(monomer, "O", rng)
    assert len(cage) == 24 * len(monomer) and cage.radius_a > ring.radius_a


def test_read_atoms_leaves_out_water_and_reads_compressed_files(tmp_path: Path):
    pytest.importorskip("gemmi")
    atoms = helix_atoms()
    for name in ("model.pdb", "model.pdb.gz"):
        write_pdb(tmp_path / name, atoms)
        read = read_atoms(tmp_path / name)
        assert len(read) == len(atoms)  # the water is not a polymer atom
        np.testing.assert_allclose(np.sort(read.xyz[:, 2]), np.sort(atoms.xyz[:, 2]), atol=1e-3)
        assert sorted(set(read.z.tolist())) == [6, 7, 8]
    with pytest.raises(MapError, match="fewer than"):
        read_atoms(tmp_path / "model.pdb", min_atoms=10_000)
    (tmp_path / "bad.pdb.gz").write_bytes(b"not gzip")
    with pytest.raises(MapError, match="bad.pdb.gz"):
        read_atoms(tmp_path / "bad.pdb.gz")


def test_structure_map_spans_the_asked_fraction_and_weights_by_element():
    ring = assemble(helix_atoms(), "C5", np.random.default_rng(1))
    density = structure_map(ring, 64, fill=0.5)
    assert density.box == 64 and density.source == "helix:C5"
    assert np.isclose(density.pixel_size_a, (2 * ring.radius_a + 8) / 32)
    threshold = map_threshold(density)
    diameter = particle_diameter_px((density.data >= threshold).astype(np.float32))
    assert 22 <= diameter <= 36  # the assembly's diameter spans about half the box
    # total density is the sum of the atomic numbers (the splat and blur keep mass)
    assert np.isclose(density.data.sum(), ring.z.sum(), rtol=1e-3)
    centre = np.array(np.unravel_index(np.argmax(density.data), density.data.shape))
    assert np.abs(centre - 32).max() < 20

"""The manifests of the corpus build: what each step made, as ``<folder>/manifest.json``.

Every step of :mod:`particleseg_model.corpus.build` writes one manifest into its output folder
(one folder per partition) and the next step reads it: paths, parameters and counts, never the
data itself (Zarr stores and RELION outputs are passed by path). The JSON is the contract with
whatever else reads these folders (the Dagster assets, the demo, the fault tests): its keys and
values are fixed here, one ``to_json``/``from_json`` pair per manifest. Paths are written as
text (``str(path)``); the corpus root stays text because it may be a URL (``s3://...``).

Each manifest is written atomically (:func:`particleseg_model.atomic.atomic_write_json`), so a
reader sees the previous version or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from particleseg_model.atomic import atomic_write_json
from particleseg_model.corpus.reference import ReferenceMap

__all__ = [
    "MANIFEST",
    "LabelsManifest",
    "MaskManifest",
    "RefinedManifest",
    "StacksManifest",
    "read_manifest",
    "write_manifest",
]

MANIFEST = "manifest.json"
"""The manifest's file name inside a step's output folder."""


def write_manifest(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically (the folder is created when missing).

    Parameters
    ----------
    folder
        The step's output folder (one per partition).
    manifest
        JSON-able values; other objects (paths, dates) are written as ``str(value)``.

    Returns
    -------
    Path
        ``folder/manifest.json``.
    """
    return atomic_write_json(Path(folder) / MANIFEST, manifest, indent=2)


def read_manifest(folder: str | os.PathLike[str], asset_name: str) -> dict[str, Any]:
    """The manifest in ``folder`` as written.

    Parameters
    ----------
    folder
        The step's output folder.
    asset_name
        The step (Dagster asset) that writes it, named in the error.

    Returns
    -------
    dict
        The decoded JSON.

    Raises
    ------
    FileNotFoundError
        ``folder/manifest.json`` does not exist (the step has not run for this partition).
    """
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: materialize {asset_name} for this partition first"
        )
    return json.loads(path.read_text())


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _text(value: Path | None) -> str | None:
    return str(value) if value is not None else None


class _Manifest:
    """``write``/``read`` shared by the manifests (each defines ``to_json``/``from_json``)."""

    ASSET = ""
    """The step (Dagster asset) that writes this manifest, named in the missing-file error."""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Any:
        raise NotImplementedError

    def write(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``folder/manifest.json`` atomically; returns its path."""
        return write_manifest(folder, self.to_json())

    @classmethod
    def read(cls, folder: str | os.PathLike[str], asset_name: str | None = None) -> Any:
        """The manifest in ``folder``; ``FileNotFoundError`` naming ``asset_name`` (default:
        the step that writes it) when there is none."""
        return cls.from_json(read_manifest(folder, asset_name or cls.ASSET))


@dataclass(frozen=True)
class StacksManifest(_Manifest):
    """The particle images of one entry and their STAR file (``particle_stacks``).

    ``kind``: "particles" (deposited stacks) or "micrographs" (extracted with RELION).
    ``particles_star`` names images relative to ``base_dir``. ``box_px`` and ``pixel_size_a``
    (Angstrom per pixel) are the particles'. ``maps``: the entry's map files (density maps and
    masks as deposited). ``ground_truth``: the simulator's per-particle truth (CSV), when the
    entry has one. ``extraction``: RELION's extraction parameters (micrograph entries only).
    ``map_resolution_a``: the resolution of the reference map (else the best of the entry's
    EMDB maps), None when unknown. ``reference``: the map that labels the partition (JSON key
    ``reference_map``: path, EMDB id, resolution, voxel size, sha256, how it was chosen; see
    :class:`~particleseg_model.corpus.reference.ReferenceMap`), None in manifests written
    before maps came from EMDB. ``negatives`` (micrograph entries with negatives asked for):
    the boxes cut far from every pick, extracted as the particles were and never refined or
    projected: ``star`` (their STAR file, image names relative to ``base_dir``), ``count``,
    ``micrographs`` (how many gave at least one), ``micrographs_with_picks``,
    ``per_micrograph_max``, ``diameter_px`` and ``min_distance_px`` (micrograph pixels),
    ``rule`` (one sentence); None otherwise (see :attr:`negatives_star`).
    """

    ASSET = "particle_stacks"

    empiar_id: str
    kind: Literal["particles", "micrographs"]
    particles_star: Path
    base_dir: Path
    n_particles: int
    box_px: int
    pixel_size_a: float
    has_poses: bool
    maps: tuple[Path, ...]
    ground_truth: Path | None
    extraction: dict[str, Any] | None
    map_resolution_a: float | None
    downloaded_bytes: int
    reference: ReferenceMap | None = None
    negatives: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "empiar_id": self.empiar_id,
            "kind": self.kind,
            "particles_star": str(self.particles_star),
            "base_dir": str(self.base_dir),
            "n_particles": self.n_particles,
            "box_px": self.box_px,
            "pixel_size_a": self.pixel_size_a,
            "has_poses": self.has_poses,
            "maps": [str(p) for p in self.maps],
            "ground_truth": _text(self.ground_truth),
            "extraction": self.extraction,
            "map_resolution_a": self.map_resolution_a,
            "downloaded_bytes": self.downloaded_bytes,
            "reference_map": self.reference.to_json() if self.reference else None,
            "negatives": self.negatives,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StacksManifest:
        return cls(
            empiar_id=data["empiar_id"],
            kind=data["kind"],
            particles_star=Path(data["particles_star"]),
            base_dir=Path(data["base_dir"]),
            n_particles=int(data["n_particles"]),
            box_px=int(data["box_px"]),
            pixel_size_a=float(data["pixel_size_a"]),
            has_poses=bool(data["has_poses"]),
            maps=tuple(Path(p) for p in data.get("maps", [])),
            ground_truth=_optional_path(data.get("ground_truth")),
            extraction=data.get("extraction"),
            map_resolution_a=data.get("map_resolution_a"),
            downloaded_bytes=int(data.get("downloaded_bytes", 0)),
            reference=(
                ReferenceMap.from_json(data["reference_map"]) if data.get("reference_map") else None
            ),
            negatives=data.get("negatives"),
        )

    @property
    def negatives_star(self) -> Path | None:
        """The negatives' STAR file (None without negatives)."""
        return Path(self.negatives["star"]) if self.negatives and self.negatives["count"] else None

    @property
    def n_negatives(self) -> int:
        return int(self.negatives["count"]) if self.negatives else 0

    def density_map(self) -> Path | None:
        """The map that labels the partition: :attr:`reference`'s, else (a manifest written
        before) the density map deposited in the archive."""
        if self.reference is not None:
            return self.reference.path
        return self.deposited_maps()[0]

    def deposited_maps(self) -> tuple[Path | None, Path | None]:
        """(the deposited density map, a deposited mask) among :attr:`maps`: a file whose name
        says "mask" is a mask, the first other one the density."""
        density = mask = None
        for path in self.maps:
            if "mask" in path.name.lower():
                mask = mask or path
            else:
                density = density or path
        return density, mask


@dataclass(frozen=True)
class RefinedManifest(_Manifest):
    """The particles with their poses (``refined_particles``).

    ``source``: "deposited" (the depositors' STAR file) or "refine" (RELION auto-refine, whose
    final map is ``refined_map``). ``particles_star`` names images relative to ``base_dir``.
    """

    ASSET = "refined_particles"

    empiar_id: str
    source: Literal["deposited", "refine"]
    particles_star: Path
    base_dir: Path
    refined_map: Path | None
    n_particles: int
    box_px: int
    pixel_size_a: float

    def to_json(self) -> dict[str, Any]:
        return {
            "empiar_id": self.empiar_id,
            "source": self.source,
            "particles_star": str(self.particles_star),
            "base_dir": str(self.base_dir),
            "refined_map": _text(self.refined_map),
            "n_particles": self.n_particles,
            "box_px": self.box_px,
            "pixel_size_a": self.pixel_size_a,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RefinedManifest:
        return cls(
            empiar_id=data["empiar_id"],
            source=data["source"],
            particles_star=Path(data["particles_star"]),
            base_dir=Path(data["base_dir"]),
            refined_map=_optional_path(data.get("refined_map")),
            n_particles=int(data["n_particles"]),
            box_px=int(data["box_px"]),
            pixel_size_a=float(data["pixel_size_a"]),
        )


@dataclass(frozen=True)
class MaskManifest(_Manifest):
    """The mask volume (``mask_volume``): ``mask`` (MRC, values 0..1 with a soft edge) made
    from ``map`` at the particles' ``box_px`` and ``pixel_size_a``; the MaskCreate parameters
    (``lowpass_a`` Angstrom, ``extend_px`` and ``soft_edge_px`` voxels) and the binarisation
    ``threshold`` used (NaN for a deposited mask taken as it is)."""

    ASSET = "mask_volume"

    map: str
    lowpass_a: float
    extend_px: float
    soft_edge_px: float
    threshold: float
    box_px: int
    pixel_size_a: float
    mask: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "map": self.map,
            "lowpass_a": self.lowpass_a,
            "extend_px": self.extend_px,
            "soft_edge_px": self.soft_edge_px,
            "threshold": self.threshold,
            "box_px": self.box_px,
            "pixel_size_a": self.pixel_size_a,
            "mask": str(self.mask),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MaskManifest:
        return cls(
            map=data["map"],
            lowpass_a=float(data["lowpass_a"]),
            extend_px=float(data["extend_px"]),
            soft_edge_px=float(data["soft_edge_px"]),
            threshold=float(data["threshold"]),
            box_px=int(data["box_px"]),
            pixel_size_a=float(data["pixel_size_a"]),
            mask=Path(data["mask"]),
        )

    def params(self) -> dict[str, float]:
        """The MaskCreate parameters as the corpus records them (``mask_params``)."""
        return {
            "lowpass_a": self.lowpass_a,
            "extend_px": self.extend_px,
            "soft_edge_px": self.soft_edge_px,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class LabelsManifest(_Manifest):
    """The labelled partition (``particle_masks``): ``n_particles`` written to the Zarr group
    ``empiar_id`` under ``corpus_root`` (a path or a URL), ``skipped`` unreadable rows dropped,
    ``label_fractions`` (background, signal, edge) over the particles' pixels written;
    ``n_negatives`` all-background negatives written beside them (not in ``n_particles`` nor in
    the fractions). :meth:`attrs` are the corpus group's attributes, as recorded in the Zarr
    store too."""

    ASSET = "particle_masks"

    corpus_root: str
    empiar_id: str
    n_particles: int
    skipped: int
    label_fractions: tuple[float, float, float]
    pixel_size_a: float
    threshold: float
    edge_px: int
    source_star: str
    pose_source: str
    mask: str
    mask_params: dict[str, float]
    run_id: str | None
    """The run that wrote the partition (JSON key ``dagster_run_id``, kept for the readers)."""
    n_negatives: int = 0

    def attrs(self) -> dict[str, Any]:
        """The attributes of the corpus group (Zarr ``attrs``), in the manifest's order."""
        return {
            "pixel_size_a": self.pixel_size_a,
            "threshold": self.threshold,
            "edge_px": self.edge_px,
            "source_star": self.source_star,
            "pose_source": self.pose_source,
            "mask": self.mask,
            "mask_params": dict(self.mask_params),
            "dagster_run_id": self.run_id,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "corpus_root": self.corpus_root,
            "empiar_id": self.empiar_id,
            "n_particles": self.n_particles,
            "skipped": self.skipped,
            "label_fractions": list(self.label_fractions),
            **self.attrs(),
            "n_negatives": self.n_negatives,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelsManifest:
        background, signal, edge = (float(f) for f in data["label_fractions"])
        return cls(
            corpus_root=data["corpus_root"],
            empiar_id=data["empiar_id"],
            n_particles=int(data["n_particles"]),
            skipped=int(data["skipped"]),
            label_fractions=(background, signal, edge),
            pixel_size_a=float(data["pixel_size_a"]),
            threshold=float(data["threshold"]),
            edge_px=int(data["edge_px"]),
            source_star=data["source_star"],
            pose_source=data["pose_source"],
            mask=data["mask"],
            mask_params=dict(data["mask_params"]),
            run_id=data.get("dagster_run_id"),
            n_negatives=int(data.get("n_negatives", 0)),
        )

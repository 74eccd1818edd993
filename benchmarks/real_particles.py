"""Real particles: does the model see them? ROC AUC on boxes cut from real micrographs.

The labelled set (``../shared/data/real``, read in place; see its README):

- **EMPIAR-10017** (beta-galactosidase; CryoSegNet's 20 *denoised* JPEG micrographs, 4096 px,
  1.77 A/px). Every micrograph is binned 4 x 4 (mean) to 1024 px, where the particle (a disk
  of 108 px in the JPEG frame) is 27 px across, and boxes are :data:`BOX` = 54 px, so the
  particle spans half the box as in the training corpus (signal ~20% of the box); the model
  resizes them to its input. The JPEG shows particles dark; boxes are inverted (particles
  bright, as in the corpus). The JPEG's outer :data:`JPEG_BORDER` px are a denoising artefact
  (stripes): boxes must lie inside that border or are skipped.

  - ``good``: boxes at the expert picks: ``csv_files`` for ``Falcon_2012_06_12-14_33_35_0``,
    the disk centres of the mask JPEG for the other micrographs (:func:`disk_centres`: the
    mask eroded to the disks' cores, one centroid per core, so touching disks count apart).
  - ``empty_ice``: grid points at least one particle diameter from every pick *and* at least
    0.75 diameter from every peak of the blob detector (:func:`blob_peaks`, peaks as strong
    as the weakest quarter of the expert picks), off the carbon. Expert picks are incomplete
    (DESIGN 4): without the blob filter such boxes often hold unpicked particles; they are
    kept apart as ``unpicked_far`` and *not* counted as junk. The filter uses the blob
    detector, so the blob baseline's AUC against ``empty_ice`` is optimistic by construction.
  - ``off_centre``: a pick shifted by one particle radius (13.5 px) in a random direction,
    kept when the shifted centre is at least a radius from every other pick.
  - ``between``: the midpoint of two picks 1.2-2 diameters apart, kept when it is at least
    0.6 diameter from every pick.
  - ``carbon``: grid points on the carbon film of the micrographs in
    :data:`CARBON_MICROGRAPHS` (seen by eye: the carbon is the large dark region without picks
    beyond a curved edge; ``Falcon_2012_06_12-14_57_34_0``, which the README names, has none):
    the region is found as the large connected area of points 1.5 diameters from every pick,
    darker than the ice around the picks.

- **MicrographCleaner's micrograph** (``Ucsf_stack_1142_DW.mrc``, 927 x 959 px): its 45
  autopick coordinates, box 46 px as its tests use; ``mc_clean`` (33) where its predicted
  contamination probability at the coordinate is <= 0.5, ``mc_contamination`` (12) where it
  is > 0.5. The MRC also shows particles dark: inverted. Boxes that overhang the micrograph
  are padded with the micrograph's mean (all 45 are kept).

Every box is normalised as the corpus was (``normalise_images``: RELION's background, beyond
0.375 x box from the centre, to mean 0 and std 1 after removing its plane).

Scores (higher = more particle-like, for all):

- the model's: ``ets`` and ``calibrated`` as ``particleseg clean`` computes them (the
  registered model's labels through ``predict_labels``; ``edge_to_signal``;
  ``calibrated_scores`` with the manifest's reference), and the share of boxes with any
  predicted signal;
- baselines: ``disc_variance`` (variance inside the central disc of radius box/4, the
  particle's radius; ``clean_quality.py``'s box/3 scores lower here: 0.736 vs 0.847 for good
  vs all junk on 10017, 0.505 vs 0.680 against off-centre picks) and ``blob``
  (scale-normalised Laplacian of Gaussian, sigma = radius / sqrt 2, negated, at the box
  centre);
- ``topaz``: Topaz's pretrained ``resnet16`` detector (``topaz-em`` in a venv of its own,
  never a dependency of the project), run with ``preprocess`` (``-s 4`` on the JPEG written
  as MRC, ``-s 1`` on the MRC) and ``segment -m resnet16 -d -1`` on the same micrographs; the
  score of a box is the maximum of Topaz's map within :data:`TOPAZ_RADIUS` px of its centre.

ROC AUC per comparison: good vs each junk kind and vs all junk (10017), clean vs contamination
(MicrographCleaner).

    .venv/bin/python benchmarks/real_particles.py [--model PATH | --registry ROOT]
        [--topaz-venv DIR] [--setup-topaz] [--no-topaz] [--json PATH] [--png PATH]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import REPO, RESULTS_DIR, write_results  # noqa: E402 - the module next door

from particleseg_model.simulation.simulate import normalise_images  # noqa: E402

# --- EMPIAR-10017 geometry (JPEG frame 4096 px, 1.77 A/px)
BIN = 4  # JPEG px per binned px
DIAMETER_JPEG = 108.0  # the masks' disk diameter, JPEG px
DIAMETER = DIAMETER_JPEG / BIN  # 27 binned px
RADIUS = DIAMETER / 2
BOX = 54  # binned px: the particle spans half the box, as in the corpus
JPEG_BORDER = 128  # JPEG px of denoising stripes along every side
BORDER = JPEG_BORDER // BIN
CSV_MICROGRAPH = "Falcon_2012_06_12-14_33_35_0"
CARBON_MICROGRAPHS = (
    "Falcon_2012_06_12-14_33_35_0",
    "Falcon_2012_06_12-15_27_22_0",
    "Falcon_2012_06_12-15_30_21_0",
    "Falcon_2012_06_12-15_46_37_0",
    "Falcon_2012_06_12-15_53_09_0",
)
MAX_GOOD_PER_MIC = 150  # picks drawn per micrograph (all would be ~12,900 boxes)
MAX_JUNK_PER_MIC = 40  # boxes of each junk kind per micrograph
# --- MicrographCleaner's micrograph
MC_BOX = 46
MC_THRESHOLD = 0.5
# --- Topaz
TOPAZ_RADIUS = 3  # px (binned frame): the map's maximum this close to a box centre
TOPAZ_VENV = REPO / "data" / "bench" / "topaz-venv"
TOPAZ_CACHE = REPO / "data" / "bench" / "topaz-maps"
TORCH_CPU = "torch==2.13.0"  # the CPU wheel; plain `torch` pulls GBs of CUDA wheels

JUNK_KINDS = ("empty_ice", "off_centre", "between", "carbon")
KINDS_10017 = ("good", *JUNK_KINDS, "unpicked_far")
KINDS = ("good", *JUNK_KINDS, "unpicked_far", "mc_clean", "mc_contamination", "raw_good")
# Raw particle stacks as RELION extracted them (not denoised, not binned), good particles only:
# (kind, file under ../shared/data, invert the contrast so that particles are bright)
RAW_STACKS = (
    ("raw_good", "particles/aspire_sample.mrcs", False),  # ASPIRE's 17, 200 px
    ("raw_good", "real/cryodrgn_empiar10076/empiar_10076_7.mrc", True),  # 7, 320 px, dark
    ("raw_good", "star/cryodrgn_relion31.mrcs", False),  # cryoDRGN's 5, 256 px
)
SCORES = ("ets", "calibrated", "centred", "disc_variance", "blob", "topaz")


# ---------------------------------------------------------------------------- box building


def real_data_dir() -> Path | None:
    """``$PARTICLESEG_SHARED_DATA/real``, else ``../shared/data/real`` beside the checkout, when
    it holds both data sets; None otherwise."""
    # not simulation.demo_archive.find_shared_data: since the move into simulation/ it looks
    # one folder too low (parents[2] is the checkout itself)
    env = os.environ.get("PARTICLESEG_SHARED_DATA")
    base = Path(env) if env else REPO.parent / "shared" / "data"
    real = base / "real"
    wanted = ("cryosegnet_empiar10017", "micrographcleaner_ucsf1142")
    return real if all((real / w).is_dir() for w in wanted) else None


def bin_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor x factor`` blocks (float32); rows/columns beyond a whole block are
    dropped. Binned pixel ``(i, j)`` covers original pixels ``factor*i .. factor*i+factor-1``."""
    data = np.asarray(image, dtype=np.float32)
    ny, nx = (s // factor for s in data.shape)
    return data[: ny * factor, : nx * factor].reshape(ny, factor, nx, factor).mean(axis=(1, 3))


def cut_boxes(
    image: np.ndarray,
    centres_xy: np.ndarray,
    box: int,
    *,
    edge: str = "skip",
    margin: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Square boxes of ``image`` centred on ``centres_xy`` ((n, 2): x = column, y = row, px).

    The box of centre ``(x, y)`` starts at ``round(y) - box // 2``, ``round(x) - box // 2``.
    ``edge="skip"``: boxes not inside ``image`` less ``margin`` px on every side are left out;
    ``edge="pad"``: they are kept, pixels beyond the image set to the image's mean.

    Returns
    -------
    (boxes (m, box, box) float32, indices (m,) of the centres they come from)
    """
    if edge not in ("skip", "pad"):
        raise ValueError(f"edge must be 'skip' or 'pad', got {edge!r}")
    data = np.asarray(image, dtype=np.float32)
    ny, nx = data.shape
    xy = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    tops = np.rint(xy[:, 1]).astype(int) - box // 2
    lefts = np.rint(xy[:, 0]).astype(int) - box // 2
    inside = (
        (tops >= margin)
        & (lefts >= margin)
        & (tops + box <= ny - margin)
        & (lefts + box <= nx - margin)
    )
    if edge == "skip":
        keep = np.flatnonzero(inside)
        out = (
            np.stack(
                [
                    data[t : t + box, s : s + box]
                    for t, s in zip(tops[keep], lefts[keep], strict=True)
                ]
            )
            if len(keep)
            else np.zeros((0, box, box), np.float32)
        )
        return out.astype(np.float32, copy=False), keep
    pad = box
    padded = np.pad(data, pad, constant_values=float(data.mean()))
    out = (
        np.stack(
            [
                padded[t + pad : t + pad + box, s + pad : s + pad + box]
                for t, s in zip(tops, lefts, strict=True)
            ]
        )
        if len(xy)
        else np.zeros((0, box, box), np.float32)
    )
    return out.astype(np.float32, copy=False), np.arange(len(xy))


def disk_centres(mask: np.ndarray, radius: float, tolerance: float = 8.0) -> np.ndarray:
    """Centres ``(n, 2)`` (x, y px) of the disks of ``radius`` px painted in a boolean mask:
    the centroids of the mask's cores (points farther than ``radius - tolerance`` from the
    background), so that overlapping disks, one connected component, count one each."""
    distance = ndi.distance_transform_edt(np.asarray(mask, bool))
    cores, n = ndi.label(distance >= radius - tolerance)
    if n == 0:
        return np.zeros((0, 2))
    yx = np.asarray(ndi.center_of_mass(cores > 0, cores, range(1, n + 1)), dtype=np.float64)
    return yx[:, ::-1].copy()


def log_response(image: np.ndarray, radius: float) -> np.ndarray:
    """The blob detector's map: ``-sigma^2 LoG`` at ``sigma = radius / sqrt 2`` (scale
    normalised; largest at the centre of a bright disc of that radius)."""
    sigma = radius / np.sqrt(2.0)
    return -(sigma**2) * ndi.gaussian_laplace(np.asarray(image, np.float32), sigma, mode="reflect")


def blob_peaks(response: np.ndarray, radius: float, threshold: float) -> np.ndarray:
    """Local maxima ``(n, 2)`` (x, y px) of a :func:`log_response` map within a window of one
    diameter, above ``threshold``."""
    size = int(2 * radius) | 1
    peaks = (response == ndi.maximum_filter(response, size=size)) & (response > threshold)
    y, x = np.nonzero(peaks)
    return np.column_stack([x, y]).astype(np.float64)


def grid_points(shape: tuple[int, int], step: float, margin: float) -> np.ndarray:
    """(x, y) points every ``step`` px, at least ``margin`` px inside an image of ``shape``."""
    ny, nx = shape
    xs = np.arange(margin, nx - margin, step)
    ys = np.arange(margin, ny - margin, step)
    gx, gy = np.meshgrid(xs, ys)
    return np.column_stack([gx.ravel(), gy.ravel()])


# ------------------------------------------------------------------------------ baselines


def disc_variance(boxes: np.ndarray, radius: float | None = None) -> np.ndarray:
    """Variance of each box ``(n, S, S)`` inside the central disc of ``radius`` px (default
    S / 4, the particle's radius at half the box): ``(n,)`` float64. A flat disc that fills
    the measured disc adds no variance: it is the particle's texture that counts."""
    data = np.asarray(boxes, dtype=np.float64)
    size = data.shape[-1]
    r = size / 4 if radius is None else radius
    y, x = np.mgrid[:size, :size] - size // 2
    disc = x**2 + y**2 <= r**2
    return data[:, disc].var(axis=1)


def blob_score(boxes: np.ndarray, radius: float | None = None) -> np.ndarray:
    """The blob detector at each box's centre: :func:`log_response` of the box (bright
    particles; ``radius`` default S / 4) at pixel ``(S // 2, S // 2)``: ``(n,)`` float64."""
    data = np.asarray(boxes, dtype=np.float32)
    size = data.shape[-1]
    r = size / 4 if radius is None else radius
    return np.array([log_response(b, r)[size // 2, size // 2] for b in data], dtype=np.float64)


def roc_auc(good: np.ndarray, junk: np.ndarray) -> float:
    """P(a good box scores above a junk one), ties counted half (Mann-Whitney U / n_g n_j);
    NaN scores rank lowest; NaN when either side is empty."""
    from scipy.stats import rankdata

    g = np.nan_to_num(np.asarray(good, np.float64), nan=-np.inf)
    j = np.nan_to_num(np.asarray(junk, np.float64), nan=-np.inf)
    if len(g) == 0 or len(j) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([g, j]))  # average ranks; -inf ties with -inf
    return float((ranks[: len(g)].sum() - len(g) * (len(g) + 1) / 2) / (len(g) * len(j)))


# ---------------------------------------------------------------------------- the set


@dataclass
class Micrograph:
    """One micrograph as the boxes are cut from it: ``image`` particles bright (binned for
    10017), ``topaz_source`` the file and scale Topaz reads (particles dark, as recorded)."""

    name: str
    image: np.ndarray
    source: Path
    topaz_scale: int


@dataclass
class LabelledSet:
    """Boxes (normalised, particles bright) with their kind, micrograph and centre."""

    boxes: dict[int, np.ndarray] = field(default_factory=dict)  # box size -> (n, S, S)
    kind: list[str] = field(default_factory=list)
    micrograph: list[str] = field(default_factory=list)
    xy: list[tuple[float, float]] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    _parts: list[np.ndarray] = field(default_factory=list)

    def add(self, kind: str, mic: str, boxes: np.ndarray, xy: np.ndarray) -> None:
        for b, c in zip(boxes, xy, strict=True):
            self._parts.append(b)
            self.kind.append(kind)
            self.micrograph.append(mic)
            self.xy.append((float(c[0]), float(c[1])))
            self.size.append(int(b.shape[-1]))

    def counts(self) -> dict[str, int]:
        kinds = np.array(self.kind)
        return {k: int((kinds == k).sum()) for k in KINDS}

    def images(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([self._parts[i] for i in rows])


def _read_gray(path: Path) -> np.ndarray:
    from PIL import Image  # matplotlib's dependency

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32)


def _read_csv_picks(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r["X-Coordinate"]), float(r["Y-Coordinate"])] for r in rows])


def _far(points: np.ndarray, others: np.ndarray, distance: float) -> np.ndarray:
    """Boolean: each point at least ``distance`` from every one of ``others``."""
    if len(others) == 0 or len(points) == 0:
        return np.ones(len(points), bool)
    d, _ = cKDTree(others).query(points)
    return d >= distance


def _draw(rng: np.random.Generator, n: int, cap: int) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(n, cap), replace=False)) if n else np.zeros(0, int)


def _carbon_region(picks: np.ndarray, shape: tuple[int, int], gray: np.ndarray) -> np.ndarray:
    """Boolean map (binned frame) of the carbon: connected areas 1.5 diameters from every
    pick, of at least 4 box areas, darker (Gaussian sigma 8 px) than the ice near the picks."""
    free = np.ones(shape, bool)
    ij = np.clip(np.rint(picks[:, ::-1]).astype(int), 0, np.array(shape) - 1)
    free[ij[:, 0], ij[:, 1]] = False
    distance = ndi.distance_transform_edt(free)
    valid = np.zeros(shape, bool)
    valid[BORDER:-BORDER, BORDER:-BORDER] = True
    far = (distance > 1.5 * DIAMETER) & valid
    labels, n = ndi.label(far)
    smooth = ndi.gaussian_filter(gray, 8)
    ice = np.median(smooth[valid & (distance < RADIUS)])
    out = np.zeros(shape, bool)
    for i in range(1, n + 1):
        region = labels == i
        if region.sum() >= 4 * BOX * BOX and smooth[region].mean() < ice:
            out |= region
    return out


def read_10017_micrograph(folder: Path, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One EMPIAR-10017 JPEG binned :data:`BIN` x :data:`BIN` (particles dark, as recorded)
    and its expert picks ``(n, 2)`` in binned pixels: the CSV for :data:`CSV_MICROGRAPH`,
    the disk centres of the mask JPEG for the others."""
    name = path.stem
    mask = _read_gray(folder / "masks" / f"{name}_mask.jpg") > 127
    picks_jpeg = (
        _read_csv_picks(folder / "csv_files" / f"{name}.csv")
        if name == CSV_MICROGRAPH
        else disk_centres(mask, DIAMETER_JPEG / 2)
    )
    # binned pixel i covers JPEG pixels 4i..4i+3: its centre is 4i + 1.5
    return bin_image(_read_gray(path), BIN), (picks_jpeg - (BIN - 1) / 2) / BIN


def build_10017(
    root: Path, rng: np.random.Generator, log=print
) -> tuple[LabelledSet, list[Micrograph]]:
    """The EMPIAR-10017 part of the set (see the module doc); boxes not normalised yet."""
    from particleseg_model.progress import progress

    folder = root / "cryosegnet_empiar10017"
    images = sorted((folder / "images").glob("*.jpg"))
    out, mics = LabelledSet(), []
    for path in progress(images, desc="10017 boxes", unit="micrograph"):
        name = path.stem
        gray, picks = read_10017_micrograph(folder, path)
        image = -gray  # the JPEG shows particles dark; the corpus has them bright
        mics.append(Micrograph(name, image, path, BIN))
        shape = image.shape

        def add(
            kind: str, xy: np.ndarray, cap: int, image: np.ndarray = image, name: str = name
        ) -> None:
            boxes, kept = cut_boxes(image, xy, BOX, margin=BORDER)
            pick = _draw(rng, len(kept), cap)
            out.add(kind, name, boxes[pick], xy[kept[pick]])

        add("good", picks, MAX_GOOD_PER_MIC)

        response = log_response(image, RADIUS)
        threshold = float(np.percentile(_sample(response, picks), 25))
        peaks = blob_peaks(response, RADIUS, threshold)
        carbon = _carbon_region(picks, shape, gray) if name in CARBON_MICROGRAPHS else None
        grid = grid_points(shape, BOX / 2, BORDER + BOX / 2)
        on_carbon = (
            carbon[np.rint(grid[:, 1]).astype(int), np.rint(grid[:, 0]).astype(int)]
            if carbon is not None
            else np.zeros(len(grid), bool)
        )
        far = _far(grid, picks, DIAMETER) & ~on_carbon
        add("empty_ice", grid[far & _far(grid, peaks, 0.75 * DIAMETER)], MAX_JUNK_PER_MIC)
        add("unpicked_far", grid[far & ~_far(grid, peaks, 0.75 * DIAMETER)], MAX_JUNK_PER_MIC)
        if carbon is not None:
            add("carbon", grid[on_carbon & _far(grid, picks, DIAMETER)], MAX_JUNK_PER_MIC)

        angle = rng.uniform(0, 2 * np.pi, len(picks))
        shifted = picks + RADIUS * np.column_stack([np.cos(angle), np.sin(angle)])
        tree = cKDTree(picks)
        nearest_two, _ = tree.query(shifted, k=2) if len(picks) > 1 else (np.zeros((0, 2)), None)
        # the nearest pick is the one shifted (distance RADIUS); the second must be as far
        alone = nearest_two[:, 1] >= RADIUS if len(picks) > 1 else np.zeros(0, bool)
        add("off_centre", shifted[alone], MAX_JUNK_PER_MIC)

        pairs = np.array(sorted(tree.query_pairs(2.0 * DIAMETER)), dtype=int).reshape(-1, 2)
        if len(pairs):
            gap = np.linalg.norm(picks[pairs[:, 0]] - picks[pairs[:, 1]], axis=1)
            pairs = pairs[gap >= 1.2 * DIAMETER]
            mids = (picks[pairs[:, 0]] + picks[pairs[:, 1]]) / 2
            add("between", mids[_far(mids, picks, 0.6 * DIAMETER)], MAX_JUNK_PER_MIC)
    return out, mics


def free_boxes_10017(
    root: Path, micrographs: slice = slice(0, None, 2)
) -> tuple[np.ndarray, list[str]]:
    """Particle-free boxes (:data:`BOX` px, inverted: particles would be bright, not
    normalised) of the EMPIAR-10017 micrographs ``sorted(...)[micrographs]`` (default the even
    ones) and those micrographs' names: every grid point at least a particle diameter from every
    expert pick and 0.75 diameter from every blob-detector peak (the ``empty_ice`` rule, ice and
    carbon alike, without the benchmark's cap of :data:`MAX_JUNK_PER_MIC`)."""
    folder = root / "cryosegnet_empiar10017"
    images = sorted((folder / "images").glob("*.jpg"))[micrographs]
    boxes, names = [], []
    for path in images:
        gray, picks = read_10017_micrograph(folder, path)
        image = -gray
        response = log_response(image, RADIUS)
        threshold = float(np.percentile(_sample(response, picks), 25))
        peaks = blob_peaks(response, RADIUS, threshold)
        grid = grid_points(image.shape, BOX / 2, BORDER + BOX / 2)
        free = _far(grid, picks, DIAMETER) & _far(grid, peaks, 0.75 * DIAMETER)
        cut, _ = cut_boxes(image, grid[free], BOX, margin=BORDER)
        boxes.append(cut)
        names.append(path.stem)
    return np.concatenate(boxes).astype(np.float32), names


def _sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    ij = np.clip(np.rint(xy[:, ::-1]).astype(int), 0, np.array(image.shape) - 1)
    return image[ij[:, 0], ij[:, 1]]


def read_star_xy(path: Path) -> np.ndarray:
    """(x, y) of a RELION coordinate STAR (``_rlnCoordinateX/Y`` in its loop)."""
    columns: list[str] = []
    rows: list[list[str]] = []
    for line in Path(path).read_text().splitlines():
        text = line.strip()
        if text.startswith("_rln"):
            columns.append(text.split()[0])
        elif columns and text and not text.startswith(("#", "data_", "loop_")):
            rows.append(text.split())
    ix, iy = columns.index("_rlnCoordinateX"), columns.index("_rlnCoordinateY")
    return np.array([[float(r[ix]), float(r[iy])] for r in rows])


def build_micrographcleaner(root: Path) -> tuple[LabelledSet, Micrograph]:
    """MicrographCleaner's micrograph: 45 autopicks, clean (probability <= 0.5) or on the
    contamination (> 0.5); boxes of 46 px padded at the edge; not normalised yet."""
    import mrcfile

    folder = root / "micrographcleaner_ucsf1142"
    mic_path = folder / "mics" / "Ucsf_stack_1142_DW.mrc"
    with mrcfile.open(mic_path, permissive=True) as f:
        image = -np.asarray(f.data, dtype=np.float32)  # recorded dark: inverted to bright
    with mrcfile.open(folder / "masks" / "Ucsf_stack_1142_DW.mrc", permissive=True) as f:
        probability = np.asarray(f.data, dtype=np.float32)
    xy = read_star_xy(folder / "coords" / "Ucsf_stack_1142_DW_autopick.star")
    junk = _sample(probability, xy) > MC_THRESHOLD
    boxes, _ = cut_boxes(image, xy, MC_BOX, edge="pad")
    out = LabelledSet()
    out.add("mc_clean", mic_path.stem, boxes[~junk], xy[~junk])
    out.add("mc_contamination", mic_path.stem, boxes[junk], xy[junk])
    return out, Micrograph(mic_path.stem, image, mic_path, 1)


def build_raw(shared: Path) -> LabelledSet:
    """The raw particle stacks of :data:`RAW_STACKS` (each its own box), not normalised yet."""
    import mrcfile

    out = LabelledSet()
    for kind, name, invert in RAW_STACKS:
        path = shared / name
        if not path.is_file():
            continue
        with mrcfile.open(path, permissive=True) as f:
            stack = np.asarray(f.data, dtype=np.float32).reshape(-1, *f.data.shape[-2:])
        out.add(kind, path.name, -stack if invert else stack, np.zeros((len(stack), 2)))
    return out


def merge(a: LabelledSet, b: LabelledSet) -> LabelledSet:
    out = LabelledSet()
    for s in (a, b):
        out._parts += s._parts
        out.kind += s.kind
        out.micrograph += s.micrograph
        out.xy += s.xy
        out.size += s.size
    return out


def save_set(path: Path, labelled: LabelledSet) -> None:
    """The labelled boxes in one ``.npz`` (per box size), written to a temporary name first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = np.array(labelled.size)
    arrays = {
        f"boxes_{s}": labelled.images(np.flatnonzero(sizes == s))
        for s in sorted(set(labelled.size))
    }
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(
        tmp,
        kind=np.array(labelled.kind),
        micrograph=np.array(labelled.micrograph),
        xy=np.array(labelled.xy),
        size=sizes,
        **arrays,
    )
    os.replace(tmp, path)


def load_set(path: Path) -> LabelledSet:
    data = np.load(path)
    out = LabelledSet()
    sizes = data["size"]
    parts: list[np.ndarray | None] = [None] * len(sizes)
    for s in sorted(set(sizes.tolist())):
        rows = np.flatnonzero(sizes == s)
        for i, b in zip(rows, data[f"boxes_{s}"], strict=True):
            parts[i] = b
    out._parts = [p for p in parts if p is not None]
    out.kind = data["kind"].tolist()
    out.micrograph = data["micrograph"].tolist()
    out.xy = [tuple(map(float, xy)) for xy in data["xy"]]
    out.size = sizes.tolist()
    return out


def subset(labelled: LabelledSet, rows: list[int]) -> LabelledSet:
    out = LabelledSet()
    out._parts = [labelled._parts[i] for i in rows]
    out.kind = [labelled.kind[i] for i in rows]
    out.micrograph = [labelled.micrograph[i] for i in rows]
    out.xy = [labelled.xy[i] for i in rows]
    out.size = [labelled.size[i] for i in rows]
    return out


# ------------------------------------------------------------------------------- Topaz


def setup_topaz(venv: Path, log=print) -> Path:
    """``python3.11 -m venv DIR`` and ``pip install torch==2.13.0 topaz-em`` (one resolve, so
    pip picks the torchvision that goes with that torch); returns DIR/bin/python."""
    python = venv / "bin" / "python"
    if not python.is_file():
        log(f"creating Topaz's venv in {venv} (once)")
        subprocess.run(
            [shutil.which("python3.11") or sys.executable, "-m", "venv", str(venv)], check=True
        )
    probe = subprocess.run(
        [str(python), "-c", "import topaz.commands.segment"], capture_output=True
    )
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", TORCH_CPU, "topaz-em"], check=True)
    return python


def _topaz(python: Path, command: str, args: list[str]) -> None:
    # `python -m topaz.commands.X` rather than the `topaz` entry point: that one imports the
    # training command and with it torchvision, whose PyPI wheel (built for CUDA torch) cannot
    # load its operators against the CPU torch; preprocess and segment never use torchvision.
    run = subprocess.run(
        [str(python), "-m", f"topaz.commands.{command}", *args], capture_output=True, text=True
    )
    if run.returncode != 0:
        raise RuntimeError(f"topaz {command} failed ({run.returncode}): {run.stderr[-2000:]}")


def topaz_maps(
    python: Path, mics: list[Micrograph], cache: Path, log=print
) -> dict[str, np.ndarray]:
    """Topaz resnet16's segmentation map of every micrograph, at the boxes' frame (binned for
    10017): ``preprocess -s SCALE`` (its own downsampling and GMM normalisation) then
    ``segment -m resnet16 -d -1``; maps kept in ``cache`` as TIFF and reused."""
    import mrcfile
    from PIL import Image

    from particleseg_model.progress import progress

    cache.mkdir(parents=True, exist_ok=True)
    target = {m.name: cache / f"{m.name}.s{m.topaz_scale}.tiff" for m in mics}
    missing = [m for m in mics if not target[m.name].is_file()]
    # one preprocess and one segment call per scale: each call pays torch's start-up once
    for scale in sorted({m.topaz_scale for m in missing}):
        batch = [m for m in missing if m.topaz_scale == scale]
        with tempfile.TemporaryDirectory(prefix="topaz-") as tmp:
            work = Path(tmp)
            sources = []
            for mic in progress(batch, desc=f"topaz input s{scale}", unit="micrograph"):
                if mic.source.suffix.lower() == ".mrc":
                    sources.append(mic.source)
                    continue
                source = work / f"{mic.name}.mrc"  # the JPEG as recorded (particles dark)
                with mrcfile.new(source) as f:
                    f.set_data(_read_gray(mic.source))
                sources.append(source)
            log(
                f"topaz preprocess -s {scale} + segment -m resnet16 -d -1: {len(batch)} micrographs"
            )
            started = time.perf_counter()
            _topaz(
                python,
                "preprocess",
                ["-s", str(scale), "-o", str(work / "pre"), *map(str, sources)],
            )
            for source in sources:
                if source.parent == work:
                    source.unlink()  # the full-size copies: 64 MiB each
            pre = [str(work / "pre" / f"{m.name}.mrc") for m in batch]
            _topaz(python, "segment", ["-m", "resnet16", "-d", "-1", "-o", str(work / "seg"), *pre])
            log(f"topaz took {time.perf_counter() - started:.0f} s")
            for mic in batch:
                shutil.move(str(work / "seg" / f"{mic.name}.tiff"), target[mic.name])
    maps: dict[str, np.ndarray] = {}
    for mic in mics:
        with Image.open(target[mic.name]) as im:
            maps[mic.name] = np.asarray(im, dtype=np.float32)
    return maps


def topaz_scores(
    labelled: LabelledSet, maps: dict[str, np.ndarray], mics: list[Micrograph]
) -> np.ndarray:
    """Each box's Topaz score: the map's maximum within :data:`TOPAZ_RADIUS` px of its centre
    (the map rescaled to the box frame when its size differs by a pixel or two)."""
    frame = {m.name: m.image.shape for m in mics}
    y, x = np.mgrid[-TOPAZ_RADIUS : TOPAZ_RADIUS + 1, -TOPAZ_RADIUS : TOPAZ_RADIUS + 1]
    disc = x**2 + y**2 <= TOPAZ_RADIUS**2
    dy, dx = y[disc], x[disc]
    out = np.full(len(labelled.kind), np.nan)
    xy = np.asarray(labelled.xy)
    for name, score in maps.items():
        rows = np.flatnonzero(np.array(labelled.micrograph) == name)
        sy, sx = score.shape[0] / frame[name][0], score.shape[1] / frame[name][1]
        cy = np.rint(xy[rows, 1] * sy).astype(int)[:, None] + dy
        cx = np.rint(xy[rows, 0] * sx).astype(int)[:, None] + dx
        cy = np.clip(cy, 0, score.shape[0] - 1)
        cx = np.clip(cx, 0, score.shape[1] - 1)
        out[rows] = score[cy, cx].max(axis=1)
    return out


# ------------------------------------------------------------------------------- scoring


def model_scores(
    version: Any, labelled: LabelledSet
) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
    """The model's labels and scores as ``particleseg clean`` computes them, per box size."""
    from particleseg_model.cleaning.clean import min_signal_px
    from particleseg_model.corpus.labels import SIGNAL
    from particleseg_model.model.calibration import calibrated_scores
    from particleseg_model.model.metrics import edge_to_signal
    from particleseg_model.model.predict import predict_labels_and_centre, stack_scale
    from particleseg_model.model.registry import load_model
    from particleseg_model.progress import progress

    network = load_model(version)
    reference = version.manifest.get("calibration")
    from_signal = bool(version.manifest.get("edge_from_signal", False))  # as clean does
    n = len(labelled.kind)
    ets, calibrated, signal = np.zeros(n), np.zeros(n), np.zeros(n, np.int64)
    centred = np.zeros(n)
    labels: dict[int, np.ndarray] = {}
    sizes = np.array(labelled.size)
    for size in sorted(set(labelled.size)):
        rows = np.flatnonzero(sizes == size)
        pred = np.empty((len(rows), size, size), np.uint8)
        # as clean: one scale for the set (every box of this size), at the model's input size
        spaced = np.linspace(0, len(rows) - 1, min(len(rows), 1024)).astype(int)
        sample = labelled.images(rows[spaced])
        scale = stack_scale(sample, size=version.input_size)
        with progress(total=len(rows), desc=f"model {size}px", unit="box") as bar:
            for start in range(0, len(rows), 256):
                chunk = rows[start : start + 256]
                labels_chunk, centre = predict_labels_and_centre(
                    network, labelled.images(chunk), edge_from_signal=from_signal, scale=scale
                )
                pred[start : start + len(chunk)] = labels_chunk
                centred[rows[start : start + len(chunk)]] = centre
                bar.update(len(chunk))
        speck = np.count_nonzero(pred == SIGNAL, axis=(1, 2)) < min_signal_px(
            size, version.input_size
        )
        pred[speck] = 0  # as clean scores them: a speck is no particle
        labels[size] = pred
        s = np.count_nonzero(pred == SIGNAL, axis=(1, 2))
        e = edge_to_signal(pred)
        signal[rows], ets[rows] = s, e
        calibrated[rows] = calibrated_scores(e, s, box=size, reference=reference)
    scores = {"ets": ets, "calibrated": calibrated, "centred": centred}
    return {**scores, "signal_px": signal.astype(float)}, labels


COMPARISONS = (
    *((f"good_vs_{k}", "good", (k,)) for k in JUNK_KINDS),
    ("good_vs_all_junk", "good", JUNK_KINDS),
    ("good_vs_unpicked_far", "good", ("unpicked_far",)),
    ("mc_clean_vs_contamination", "mc_clean", ("mc_contamination",)),
    ("raw_good_particles", "raw_good", ()),  # signal shares only: no raw junk beside them
)


def table(kind: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """AUC of every score for every comparison, with counts and the share with signal."""
    out: dict[str, dict[str, Any]] = {}
    has_signal = scores["signal_px"] > 0
    for name, good_kind, junk_kinds in COMPARISONS:
        good, junk = kind == good_kind, np.isin(kind, junk_kinds)
        row: dict[str, Any] = {"n_good": int(good.sum()), "n_junk": int(junk.sum())}
        for score in SCORES:
            if score in scores:
                auc = roc_auc(scores[score][good], scores[score][junk])
                # null, not NaN, where there is no junk to compare with: the JSON stays JSON
                row[f"auc_{score}"] = round(auc, 4) if np.isfinite(auc) else None
        row["signal_share_good"] = round(float(has_signal[good].mean()), 4) if good.any() else None
        row["signal_share_junk"] = round(float(has_signal[junk].mean()), 4) if junk.any() else None
        out[name] = row
    return out


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    cols = [s for s in SCORES if any(f"auc_{s}" in r for r in rows.values())]
    head = f"{'comparison':28s} {'good':>5s} {'junk':>5s} " + " ".join(f"{c:>13s}" for c in cols)
    print(head + f" {'signal good':>11s} {'signal junk':>11s}")
    for name, r in rows.items():
        aucs = " ".join(f"{_or_nan(r.get(f'auc_{c}')):13.3f}" for c in cols)
        sg = "" if r["signal_share_good"] is None else f"{100 * r['signal_share_good']:10.1f}%"
        sj = "" if r["signal_share_junk"] is None else f"{100 * r['signal_share_junk']:10.1f}%"
        print(f"{name:28s} {r['n_good']:5d} {r['n_junk']:5d} {aucs} {sg:>11s} {sj:>11s}")


# ------------------------------------------------------------------------------- figures


def write_gallery(
    path: Path,
    labelled: LabelledSet,
    labels: dict[int, np.ndarray],
    rng: np.random.Generator,
    per_kind: int = 8,
) -> Path:
    """Rows of ``per_kind`` boxes of each kind (in :data:`KINDS` order) above the model's
    masks (background black, edge gray, signal white), bands separated by a light line."""
    from particleseg_model.corpus.labels import resize_images, resize_labels
    from particleseg_model.figures import particles_with_masks, write_png

    kinds, sizes = np.array(labelled.kind), np.array(labelled.size)
    grids, shown = [], []
    for k in KINDS:
        rows = np.flatnonzero(kinds == k)
        if not len(rows):
            continue
        pick = rows[_draw(rng, len(rows), per_kind)]
        # a kind of several boxes (the raw stacks) is shown at one, at most 64 px
        size = min(int(sizes[pick[0]]), 64)
        images, masks = [], []
        for row in pick:
            own = int(sizes[row])
            where = int(np.searchsorted(np.flatnonzero(sizes == own), row))
            images.append(resize_images(labelled.images(np.array([row])), size)[0])
            masks.append(resize_labels(labels[own][where : where + 1], size)[0])
        grids.append(particles_with_masks(np.stack(images), np.stack(masks), columns=per_kind))
        shown.append(k)
    width = max(g.shape[1] for g in grids)
    bands = []
    for g in grids:
        band = np.full((g.shape[0], width), 64, np.uint8)
        band[:, : g.shape[1]] = g
        bands += [band, np.full((3, width), 200, np.uint8)]
    return write_png(path, np.vstack(bands[:-1]), {"rows": ", ".join(shown)})


def write_figure(
    path: Path, kind: np.ndarray, scores: dict[str, np.ndarray], rows: dict[str, dict[str, Any]]
) -> Path:
    """ROC curves (10017 good vs all junk; MicrographCleaner) and score histograms per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from particleseg_model.atomic import atomic_path

    def roc(g: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.nan_to_num(g, nan=-np.inf)
        j = np.nan_to_num(j, nan=-np.inf)
        cuts = np.unique(np.concatenate([g, j, [np.inf]]))[::-1]
        return (
            np.array([(j >= c).mean() for c in cuts]),
            np.array([(g >= c).mean() for c in cuts]),
        )

    names = [s for s in SCORES if s in scores]
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax, (title, gk, jk, comp) in zip(
        axes[0, :2],
        [
            ("EMPIAR-10017: good vs all junk", "good", JUNK_KINDS, "good_vs_all_junk"),
            (
                "MicrographCleaner: clean vs contamination",
                "mc_clean",
                ("mc_contamination",),
                "mc_clean_vs_contamination",
            ),
        ],
        strict=True,
    ):
        g, j = kind == gk, np.isin(kind, jk)
        for s in names:
            fpr, tpr = roc(scores[s][g], scores[s][j])
            ax.plot(fpr, tpr, label=f"{s} (AUC {rows[comp][f'auc_{s}']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(
            title=f"{title} ({g.sum()} / {j.sum()})",
            xlabel="junk kept (FPR)",
            ylabel="good kept (TPR)",
        )
        ax.legend(fontsize=8, loc="lower right")
    present = [k for k in KINDS if (kind == k).any()]
    share = [float((scores["signal_px"][kind == k] > 0).mean()) for k in present]
    axes[0, 2].bar(range(len(present)), [100 * s for s in share])
    axes[0, 2].set_xticks(range(len(present)), present, rotation=30, ha="right", fontsize=8)
    axes[0, 2].set(title="boxes with any predicted signal", ylabel="%", ylim=(0, 100))
    for ax, s in zip(
        axes[1], ("disc_variance", "blob", "topaz" if "topaz" in scores else "ets"), strict=True
    ):
        for k in present:
            v = scores[s][kind == k]
            v = v[np.isfinite(v)]
            if len(v):
                ax.hist(v, bins=40, histtype="step", density=True, label=k)
        ax.set(title=s, xlabel="score (higher = particle)", ylabel="density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", help="a registered version folder or its model.keras")
    where.add_argument(
        "--registry", help="a model registry: its latest version (default data/models)"
    )
    parser.add_argument("--topaz-venv", type=Path, default=TOPAZ_VENV)
    parser.add_argument("--setup-topaz", action="store_true", help="create Topaz's venv if missing")
    parser.add_argument("--no-topaz", action="store_true", help="leave Topaz out")
    parser.add_argument("--topaz-cache", type=Path, default=TOPAZ_CACHE)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "real_particles.json")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "real_particles.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set-cache",
        type=Path,
        default=REPO / "data" / "bench" / "real_set.npz",
        help="the labelled boxes, built once (with --no-topaz; Topaz needs the micrographs)",
    )
    parser.add_argument(
        "--exclude-training-micrographs",
        action="store_true",
        help="leave out the 10017 micrographs whose negatives the model was trained on "
        "(its manifest's provenance)",
    )
    parser.add_argument(
        "--micrographs",
        choices=("all", "even", "odd"),
        default="all",
        help="the EMPIAR-10017 micrographs to score (sorted by name; the pretrained model's "
        "backgrounds and negatives come from the even ones)",
    )
    args = parser.parse_args(argv)

    from particleseg_model.model.registry import resolve_model

    root = real_data_dir()
    if root is None:
        print(
            "no real micrographs: ../shared/data/real "
            "(or $PARTICLESEG_SHARED_DATA/real) is missing",
            file=sys.stderr,
        )
        return 2
    try:
        version = resolve_model(
            args.model, args.registry or (None if args.model else REPO / "data" / "models")
        )
    except FileNotFoundError as exc:
        print(f"{exc}; give --model PATH to a registered version folder", file=sys.stderr)
        return 2

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    mics: list[Micrograph] = []
    labelled = None
    if args.set_cache is not None and args.set_cache.is_file() and args.no_topaz:
        labelled = load_set(args.set_cache)
        if "raw_good" not in labelled.kind:  # a cache from before the raw stacks joined
            labelled = None
    if labelled is None:
        part, mics = build_10017(root, rng)
        mc, mc_mic = build_micrographcleaner(root)
        labelled = merge(merge(part, mc), build_raw(root.parent))
        mics.append(mc_mic)
        sizes = np.array(labelled.size)
        for size in set(labelled.size):  # the corpus' normalisation, at each box size
            rows = np.flatnonzero(sizes == size)
            normalised = normalise_images(labelled.images(rows))[0]
            for i, r in enumerate(rows):
                labelled._parts[r] = normalised[i]
        if args.set_cache is not None:
            save_set(args.set_cache, labelled)
    held_out_note = "all micrographs"
    if args.exclude_training_micrographs:
        trained = set(
            version.manifest.get("provenance", {})
            .get("negatives", {})
            .get("neg-empiar-10017", {})
            .get("micrographs", [])
        )
        keep = [i for i, m in enumerate(labelled.micrograph) if m not in trained]
        labelled = subset(labelled, keep)
        held_out_note = f"without the {len(trained)} micrographs whose negatives the model saw"
    if args.micrographs != "all":
        # the shipped model saw the even ones: "odd" compares any model on what it never saw
        names = sorted(p.stem for p in (root / "cryosegnet_empiar10017" / "images").glob("*.jpg"))
        chosen = set(names[0 if args.micrographs == "even" else 1 :: 2])
        keep = [
            i
            for i, (m, k) in enumerate(zip(labelled.micrograph, labelled.kind, strict=True))
            if m in chosen or k not in KINDS_10017
        ]
        labelled = subset(labelled, keep)
        held_out_note += f"; the {args.micrographs} 10017 micrographs only"
    sizes = np.array(labelled.size)
    kind = np.array(labelled.kind)
    print(f"labelled set: {labelled.counts()} ({time.perf_counter() - t0:.0f} s)")

    scores, labels = model_scores(version, labelled)
    disc, blob = np.zeros(len(kind)), np.zeros(len(kind))
    for size in set(labelled.size):
        rows = np.flatnonzero(sizes == size)
        images = labelled.images(rows)
        disc[rows], blob[rows] = disc_variance(images), blob_score(images)
    scores["disc_variance"], scores["blob"] = disc, blob
    topaz_note = "left out (--no-topaz)"
    if not args.no_topaz:
        python = args.topaz_venv / "bin" / "python"
        if args.setup_topaz or not python.is_file():
            python = setup_topaz(args.topaz_venv)
        scores["topaz"] = topaz_scores(labelled, topaz_maps(python, mics, args.topaz_cache), mics)
        topaz_note = f"topaz-em resnet16 via {python}"

    rows = table(kind, scores)
    print(f"model: {version.path} ({version.manifest.get('arch')}, input {version.input_size} px)")
    print_table(rows)
    gallery = args.png.with_name(args.png.stem + "_gallery.png")
    write_gallery(gallery, labelled, labels, rng)
    write_figure(args.png, kind, scores, rows)
    figures = {
        "model": str(version.path),
        "model_arch": version.manifest.get("arch"),
        "model_input_px": version.input_size,
        "counts": labelled.counts(),
        "box_px": {"empiar10017": BOX, "micrographcleaner": MC_BOX},
        "bin_10017": BIN,
        "particle_diameter_px_10017": DIAMETER,
        "topaz": topaz_note,
        "micrographs": held_out_note,
        "comparisons": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_results(args.json, "real_particles", {k: str(v) for k, v in vars(args).items()}, figures)
    print(f"wrote {args.json}, {args.png}, {gallery}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())

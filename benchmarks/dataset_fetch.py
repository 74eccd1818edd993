"""Dataset fetch of one partition: what the platform downloads beside a plain ``wget -r``.

A loopback mirror holds entries shaped like real ones: no map in the EMPIAR archive, the map
only in EMDB's file layout (``structures/EMD-<n>/``: the ``.map.gz``, the header XML, two half
maps under ``other/``, a mask under ``masks/``), and files the corpus does not need beside the
ones it does (micrograph movies). Two partitions:

- ``EMPIAR-10028``-shaped particles: the real folder and file names of that entry
  (``data/Particles/shiny_2sets.star``, stacks under ``MRC_0601/`` and ``MRC_1901/``, movies
  under ``data/Micrographs/Micrographs_part1|2/*_movie.mrcs``), its EMDB link ``EMD-2660``; the
  STAR file written as RELION 3.0 (as old depositions are); contents simulated (noise);
- a synthetic micrograph entry (``EMPIAR-39001``, ``EMD-99001``): single-frame micrographs with
  RELION coordinate files, plus the multi-frame movies.

For each partition and each latency (``--latency-ms``, the server's "slow" fault on every
reply), side by side:

- ``ours``: what the corpus build downloads (``fetch_entry_files`` and the EMDB map through
  ``fetch_emdb_map`` with one EMDB API lookup, as ``corpus.reference.reference_map`` does; or
  ``corpus.build.fetch_stacks`` itself with ``--via fetch_stacks``) into a fresh folder and a
  fresh map cache;
- ``ours, map cached``: the same into a fresh folder with the map cache kept (0 map bytes);
- ``ours, rerun``: the same again into the same folder (what is complete is not fetched);
- ``wget -r``: ``wget -r -np -nH --cut-dirs=N -q`` of the entry's archive folder and of the
  EMDB entry folder, everything under them, as a user without the platform downloads it.

Each row is measured ``--repeat`` times (the machines are shared): the median wall time.

Bytes are counted on the server (status line, headers and bodies written to the socket),
requests from the server's request log; both split by host part (the EMPIAR archive, EMDB's
files, the APIs, other: wget's ``robots.txt``). Times are wall seconds of the whole fetch.

    .venv/bin/python benchmarks/dataset_fetch.py [--map-box 256] [--latency-ms 0 30] [--json F]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import RESULTS_DIR, write_results  # noqa: E402

from particleseg_model.access.dataset import fetch_entry_files  # noqa: E402
from particleseg_model.access.emdb_files import fetch_emdb_map  # noqa: E402
from particleseg_model.access.empiar import EmdbClient, Entry, parse_entry  # noqa: E402
from particleseg_model.access.fixtures import emdb_record, fixture_records  # noqa: E402
from particleseg_model.access.http import HttpClient  # noqa: E402
from particleseg_model.access.mirror import Mirror, emdb_header_xml  # noqa: E402
from particleseg_model.access.server import ArchiveServer, Fault, serve  # noqa: E402
from particleseg_model.atomic import atomic_write_text  # noqa: E402
from particleseg_model.em.maps import write_mrc  # noqa: E402
from particleseg_model.em.star import format_loop_blocks  # noqa: E402

MIB = 1 << 20
# URL path prefixes of the loopback server, as the public hosts lay them out
HOSTS = {
    "/empiar/world_availability/": "archive",
    "/pub/databases/emdb/": "emdb_files",
    "/emdb/api/": "api",
    "/empiar/api/": "api",
}
HOST_NAMES = ("archive", "emdb_files", "api", "other")
RELION30_MAGNIFICATION = 10000.0


def host_of(path: str) -> str:
    """The host part a URL path belongs to (``archive``, ``emdb_files``, ``api``, ``other``)."""
    for prefix, name in HOSTS.items():
        if path.startswith(prefix):
            return name
    return "other"


# -- the mirror ---------------------------------------------------------------------------------
@dataclass
class Partition:
    """One entry of the bench mirror; sizes in bytes."""

    empiar_id: str
    emdb_id: str
    kind: str  # "particles" or "micrographs"
    shape: str  # what the entry is shaped after, in words
    record: dict[str, Any]
    archive_bytes: int = 0  # everything under the entry's archive folder
    emdb_bytes: int = 0  # everything under structures/EMD-<n>/
    needed: dict[str, int] = field(default_factory=dict)  # file -> bytes the corpus needs

    @property
    def number(self) -> str:
        return self.empiar_id.split("-", 1)[1]

    @property
    def archive_path(self) -> str:
        return f"/empiar/world_availability/{self.number}/"

    @property
    def emdb_path(self) -> str:
        return f"/pub/databases/emdb/structures/{self.emdb_id}/"

    def entry(self) -> Entry:
        return parse_entry(self.empiar_id, self.record)


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _movie(path: Path, frames: int, px: int, rng: np.random.Generator) -> None:
    """A multi-frame movie as detectors write them: 8-bit counts (MRC mode 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = rng.integers(0, 4, size=(frames, px, px), dtype=np.int8)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)


def _map_volume(box: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """A ball of density in noise (float32): it gzips about as an unmasked EMDB map does."""
    axis = np.arange(box, dtype=np.float32) - box / 2
    r2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    volume = np.exp(-r2 / (2 * (box / 6) ** 2), dtype=np.float32)
    volume += rng.normal(0, noise, size=volume.shape).astype(np.float32)
    return volume


def _put_map(mirror: Mirror, emd_id: str, box: int, pixel: float, work: Path, seed: int) -> None:
    """The EMDB entry: map, header XML, two half maps, one mask (EMDB ships masks unzipped)."""
    rng = np.random.default_rng(seed)
    volume = _map_volume(box, rng)
    paths = [write_mrc(work / f"{emd_id}_0.mrc", volume, pixel)]
    for k in (1, 2):  # half maps: the map with noise of their own
        half = volume + rng.normal(0, 0.05, volume.shape).astype(np.float32)
        paths.append(write_mrc(work / f"{emd_id}_{k}.mrc", half, pixel))
    mask = write_mrc(work / f"{emd_id}_mask.mrc", (volume > 0.3).astype(np.float32), pixel)
    mirror.put_emdb_map(
        emd_id,
        paths[0],
        header_xml=emdb_header_xml(emd_id, resolution_a=3.2, voxel_size_a=pixel, box=(box,) * 3),
        half_maps=paths[1:],
        masks=[mask],
    )
    mirror.put_emdb(emd_id, emdb_record("3.2"))
    for path in [*paths, mask]:
        path.unlink()


def _relion30_star(names: list[str], pixel: float, rng: np.random.Generator) -> str:
    """A RELION 3.0 particle STAR file: one ``data_`` block, no optics, no version stamp, the
    pixel size as ``rlnDetectorPixelSize`` (um) over ``rlnMagnification``, origins in pixels."""
    n = len(names)
    table = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnDefocusU": rng.uniform(8000, 25000, n).round(1),
            "rlnDefocusV": rng.uniform(8000, 25000, n).round(1),
            "rlnDefocusAngle": rng.uniform(0, 180, n).round(2),
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.0,
            "rlnAmplitudeContrast": 0.1,
            "rlnMagnification": RELION30_MAGNIFICATION,
            "rlnDetectorPixelSize": pixel * RELION30_MAGNIFICATION / 1e4,
            "rlnAngleRot": rng.uniform(-180, 180, n).round(3),
            "rlnAngleTilt": rng.uniform(0, 180, n).round(3),
            "rlnAnglePsi": rng.uniform(-180, 180, n).round(3),
            "rlnOriginX": rng.normal(0, 2, n).round(2),
            "rlnOriginY": rng.normal(0, 2, n).round(2),
        }
    )
    text = format_loop_blocks({"": table}, decimals=6, strict_text=True)
    return text.replace("\n# version 30001\n", "\n")  # RELION 3.0 wrote no stamp


def _particle_entry(
    mirror: Mirror, args: argparse.Namespace, work: Path, rng: np.random.Generator
) -> Partition:
    """EMPIAR-10028's folders and file names, simulated contents; RELION 3.0 STAR."""
    record = dict(fixture_records()["entries"]["EMPIAR-10028"])
    part = Partition("EMPIAR-10028", "EMD-2660", "particles", "EMPIAR-10028's layout", record)
    data = mirror.archive_path(f"{part.number}/data")
    names: list[str] = []
    per_stack = -(-args.particles // args.stacks)
    for k in range(args.stacks):
        folder = "MRC_0601" if k < (args.stacks + 1) // 2 else "MRC_1901"
        rel = f"Particles/{folder}/{k + 1:03d}_particles_shiny_nb50_new.mrcs"
        n = min(per_stack, args.particles - k * per_stack)
        if n <= 0:
            break
        images = rng.normal(0, 1, size=(n, args.box, args.box)).astype(np.float32)
        write_mrc(data / rel, images, args.pixel, stack=True)
        names += [f"{j + 1:06d}@{rel}" for j in range(n)]
        part.needed[f"data/{rel}"] = (data / rel).stat().st_size
    star = data / "Particles" / "shiny_2sets.star"
    atomic_write_text(star, _relion30_star(names, args.pixel, rng))
    part.needed["data/Particles/shiny_2sets.star"] = star.stat().st_size
    for k in range(args.movies):
        half = "Micrographs_part1" if k < (args.movies + 1) // 2 else "Micrographs_part2"
        _movie(data / "Micrographs" / half / f"{k + 4:03d}_movie.mrcs", args.frames, args.px, rng)
    _put_map(mirror, part.emdb_id, args.map_box, args.pixel, work, seed=1)
    mirror.put_entry(part.empiar_id, record)
    return part


def _micrograph_entry(
    mirror: Mirror, args: argparse.Namespace, work: Path, rng: np.random.Generator
) -> Partition:
    """A synthetic entry: single-frame micrographs with RELION coordinates, and the movies."""
    imagesets = [
        {
            "name": "Motion-corrected micrographs",
            "directory": "data/Micrographs",
            "category": "micrographs - single frame",
            "data_format": "MRC",
            "num_images_or_tilt_series": args.micrographs,
            "pixel_width": args.pixel,
            "micrographs_file_pattern": "data/Micrographs/*.mrc",
            "picked_particles_file_pattern": "data/Coordinates/*.star",
            "picked_particles_directory": "data/Coordinates",
        },
        {
            "name": "Micrograph movies",
            "directory": "data/Movies",
            "category": "micrographs - multiframe",
            "data_format": "MRCS",
            "num_images_or_tilt_series": args.movies,
            "frames_per_image": args.frames,
            "pixel_width": args.pixel,
            "micrographs_file_pattern": "data/Movies/*_movie.mrcs",
        },
    ]
    record = {
        "title": "[synthetic] micrographs with coordinates, and their movies",
        "status": "REL",
        "release_date": "2026-01-01",
        "update_date": "2026-01-01",
        "dataset_size": "1.0 TB",
        "experiment_type": "EMDB",
        "cross_references": [{"name": "EMD-99001"}],
        "citation": [],
        "imagesets": imagesets,
    }
    part = Partition("EMPIAR-39001", "EMD-99001", "micrographs", "synthetic", record)
    data = mirror.archive_path(f"{part.number}/data")
    half = args.box // 2
    for k in range(args.micrographs):
        rel = f"Micrographs/mic_{k + 1:04d}.mrc"
        image = rng.normal(0, 1, size=(args.px, args.px)).astype(np.float32)
        write_mrc(data / rel, image, args.pixel)
        xy = rng.integers(half, args.px - half, size=(args.particles // args.micrographs, 2))
        coords = pd.DataFrame({"rlnCoordinateX": xy[:, 0], "rlnCoordinateY": xy[:, 1]})
        star = data / "Coordinates" / f"mic_{k + 1:04d}.star"
        atomic_write_text(star, format_loop_blocks({"": coords}))
        part.needed[f"data/{rel}"] = (data / rel).stat().st_size
        part.needed[f"data/Coordinates/{star.name}"] = star.stat().st_size
    for k in range(args.movies):
        _movie(data / "Movies" / f"mic_{k + 1:04d}_movie.mrcs", args.frames, args.px, rng)
    _put_map(mirror, part.emdb_id, args.map_box, args.pixel, work, seed=2)
    mirror.put_entry(part.empiar_id, record)
    return part


def build_mirror(root: Path, args: argparse.Namespace) -> list[Partition]:
    """Write the bench mirror into ``root``; returns its partitions with their sizes."""
    mirror = Mirror(root)
    rng = np.random.default_rng(args.seed)
    work = root / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    partitions = [_particle_entry(mirror, args, work, rng)]
    if args.micrograph_entry:
        partitions.append(_micrograph_entry(mirror, args, work, rng))
    shutil.rmtree(work)
    for part in partitions:
        part.archive_bytes = _tree_bytes(mirror.archive_path(part.number))
        part.emdb_bytes = _tree_bytes(mirror.emdb_structure_path(part.emdb_id))
        structure = mirror.emdb_structure_path(part.emdb_id)
        for folder in ("map", "header"):  # the .map.gz and the header XML
            part.needed.update(
                {f"{folder}/{p.name}": p.stat().st_size for p in (structure / folder).iterdir()}
            )
    return partitions


# -- counting on the server ---------------------------------------------------------------------
class Traffic:
    """Bytes the server wrote to its sockets, by host part (thread-safe)."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.lock = threading.Lock()

    def add(self, host: str, n: int) -> None:
        with self.lock:
            self.bytes[host] += n

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.bytes)


class _CountedWriter:
    """Wraps a handler's ``wfile``: every byte written is added to ``traffic`` under the
    host part of the request being answered; the rest is the wrapped file's."""

    def __init__(self, inner: Any, traffic: Traffic, handler: Any):
        self.inner, self.traffic, self.handler = inner, traffic, handler

    def write(self, data: Any) -> int:
        path = getattr(self.handler, "path", "") or ""
        self.traffic.add(host_of(path.split("?", 1)[0]), len(data))
        return self.inner.write(data)

    def __getattr__(self, name: str) -> Any:  # flush, close, closed
        return getattr(self.inner, name)


def count_traffic(server: ArchiveServer) -> Traffic:
    """Install byte counting on ``server``: it keeps a request log (``server.requests``) but
    counts no bytes, so the handler class its HTTP server uses gets a counting ``wfile``."""
    traffic = Traffic()
    # the server's own handler class, subclassed: the replies stay byte for byte the same
    httpd = server._httpd  # noqa: SLF001 - no public hook for the socket writer
    base = httpd.RequestHandlerClass

    class Counting(base):  # type: ignore[valid-type, misc]
        def setup(self) -> None:
            super().setup()
            self.wfile = _CountedWriter(self.wfile, traffic, self)

    httpd.RequestHandlerClass = Counting
    return traffic


@dataclass
class Row:
    """One fetch: bytes (server-side, headers included) and requests by host part, wall time."""

    label: str
    bytes_by_host: dict[str, int]
    requests_by_host: dict[str, int]
    wall_s: float
    files: int = 0  # files the fetch left on disk
    map_gz_bytes: int = 0  # bytes of the EMDB .map.gz transferred
    note: str = ""
    wall_s_runs: list[float] = field(default_factory=list)  # every repeat; wall_s: the median

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_host.values())

    @property
    def total_requests(self) -> int:
        return sum(self.requests_by_host.values())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_bytes"] = self.total_bytes
        out["total_requests"] = self.total_requests
        return out


def measured(
    server: ArchiveServer, traffic: Traffic, label: str, fn: Callable[[], Any]
) -> tuple[Row, Any]:
    """Run ``fn`` and count what the server answered meanwhile."""
    before_bytes = traffic.snapshot()
    before_requests = len(server.requests)
    started = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - started
    time.sleep(0.05)  # the last reply's counting may finish just after the client has it
    after = traffic.snapshot()
    requests = Counter(host_of(path) for _, path, _ in server.requests[before_requests:])
    row = Row(
        label,
        {h: after[h] - before_bytes[h] for h in HOST_NAMES},
        {h: requests[h] for h in HOST_NAMES},
        wall,
    )
    return row, result


# -- the fetches --------------------------------------------------------------------------------
def fetch_ours(
    server: ArchiveServer,
    partition: Partition,
    downloads: Path,
    map_cache: Path,
    *,
    via: str = "library",
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """What the corpus build downloads for ``partition``: the entry's files, one EMDB API
    lookup and the EMDB map (header XML included), with the platform's clients.

    ``via="library"``: ``fetch_entry_files`` then ``EmdbClient.resolution_a`` and
    ``fetch_emdb_map`` (the calls ``corpus.reference.reference_map`` makes for an entry with
    one linked map); ``via="fetch_stacks"``: ``corpus.build.fetch_stacks`` itself (it also
    checks the particles, writes a gallery and its manifest: a particle partition only).
    Returns the files left on disk and the map bytes transferred."""
    entry = partition.entry()
    emdb = EmdbClient(server.emdb_url, polite_delay_s=0.0)
    http = HttpClient(server.emdb_files_url, polite_delay_s=0.0)
    if via == "fetch_stacks":
        from particleseg_model.corpus import build

        result = build.fetch_stacks(
            entry,
            server.archive_url,
            downloads,
            out_dir or downloads.parent / "particle_stacks",
            emdb_files_url=server.emdb_files_url,
            emdb=emdb,
            map_cache=map_cache,
            http=http,
        )
        reference = result.manifest.reference
        files = sum(1 for p in downloads.rglob("*") if p.is_file())
        return {"files": files, "map_gz_bytes": reference.downloaded_bytes if reference else 0}
    files = fetch_entry_files(entry, server.archive_url, downloads, progress=False)
    resolution = emdb.resolution_a(partition.emdb_id)
    fetched = fetch_emdb_map(
        partition.emdb_id,
        map_cache,
        base_url=server.emdb_files_url,
        http=http,
        resolution_a=resolution,
        progress=False,
    )
    count = (
        len(files.stacks)
        + len(files.micrographs)
        + len(files.coordinates)
        + len(files.side_files)
        + (files.particles_star is not None)
        + (files.particles_cs is not None)
    )
    return {"files": count, "map_gz_bytes": fetched.bytes_downloaded}


def wget_command(server: ArchiveServer, path: str, dest: Path) -> list[str]:
    """``wget -r -np -nH --cut-dirs=N -q`` of ``path``: N drops the folders above the last one
    (``/empiar/world_availability/10028/`` -> ``10028/...``)."""
    cut = len([p for p in path.strip("/").split("/") if p]) - 1
    return [
        "wget", "-r", "-np", "-nH", f"--cut-dirs={cut}", "-q", "-P", str(dest),
        server.url + path,
    ]  # fmt: skip


def fetch_wget(server: ArchiveServer, partition: Partition, dest: Path) -> dict[str, Any]:
    """Everything under the entry's archive folder and the EMDB entry folder, with wget."""
    for path in (partition.archive_path, partition.emdb_path):
        done = subprocess.run(
            wget_command(server, path, dest), capture_output=True, text=True, check=False
        )
        # 8: a server error reply somewhere (robots.txt's 404 does not count as one)
        if done.returncode not in (0, 8):
            raise RuntimeError(f"wget {path} failed ({done.returncode}): {done.stderr[-400:]}")
    files = [p for p in dest.rglob("*") if p.is_file()]
    listings = [p for p in files if p.name.startswith("index.html")]
    gz = dest / partition.emdb_id / "map" / f"emd_{partition.emdb_id[4:]}.map.gz"
    return {
        "files": len(files),
        "listings": len(listings),
        "map_gz_bytes": gz.stat().st_size if gz.is_file() else 0,
    }


def measure_partition(
    server: ArchiveServer,
    traffic: Traffic,
    partition: Partition,
    work: Path,
    *,
    via: str = "library",
) -> list[Row]:
    """The four rows of one partition: ours (fresh), ours (map cached), ours (rerun), wget."""
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "emdb"
    rows = []
    for label, downloads, note in (
        ("ours", work / "fresh", "fresh folder, empty map cache"),
        ("ours, map cached", work / "second", "fresh folder, the map cache of the run above"),
        ("ours, rerun", work / "second", "the same folder again: complete files not fetched"),
    ):
        row, info = measured(
            server,
            traffic,
            label,
            lambda d=downloads: fetch_ours(
                server, partition, d, cache, via=via, out_dir=d.parent / f"{d.name}_stacks"
            ),
        )
        row.files, row.map_gz_bytes, row.note = info["files"], info["map_gz_bytes"] or 0, note
        rows.append(row)
    row, info = measured(
        server, traffic, "wget -r", lambda: fetch_wget(server, partition, work / "wget")
    )
    row.files, row.map_gz_bytes = info["files"], info["map_gz_bytes"]
    row.note = f"{info['listings']} directory listings among the files"
    rows.append(row)
    for folder in ("fresh", "second", "wget", "fresh_stacks", "second_stacks", "emdb"):
        shutil.rmtree(work / folder, ignore_errors=True)
    return rows


def combine(repeats: Sequence[Sequence[Row]]) -> list[Row]:
    """Rows of repeated measurements as one: the first's counts (the same in every repeat:
    checked), the median wall time, every wall time in ``wall_s_runs``."""
    combined = []
    for rows in zip(*repeats, strict=True):
        first = rows[0]
        for other in rows[1:]:
            if other.requests_by_host != first.requests_by_host:
                raise RuntimeError(f"{first.label}: requests differ between repeats")
        times = [r.wall_s for r in rows]
        combined.append(
            Row(
                first.label,
                first.bytes_by_host,
                first.requests_by_host,
                float(np.median(times)),
                first.files,
                first.map_gz_bytes,
                first.note,
                times,
            )
        )
    return combined


def via_for(partition: Partition, via: str) -> str:
    """``via`` for a particle partition; the library calls for a micrograph one (there
    ``fetch_stacks`` would also extract the particles with RELION: not a fetch)."""
    return via if partition.kind == "particles" else "library"


def ratios(rows: Sequence[Row]) -> dict[str, float]:
    """ours / wget -r: bytes, requests, wall time."""
    ours = next(r for r in rows if r.label == "ours")
    wget = next(r for r in rows if r.label == "wget -r")
    return {
        "bytes": ours.total_bytes / wget.total_bytes,
        "requests": ours.total_requests / wget.total_requests,
        "time": ours.wall_s / wget.wall_s,
    }


def _mib(n: int) -> str:
    return f"{n / MIB:9.2f}"


def print_table(partition: Partition, latency_ms: float, rows: Sequence[Row]) -> None:
    print(
        f"\n{partition.empiar_id} ({partition.kind}, {partition.shape}) + {partition.emdb_id}, "
        f"latency {latency_ms:g} ms: archive folder {partition.archive_bytes / MIB:.1f} MiB, "
        f"EMDB folder {partition.emdb_bytes / MIB:.1f} MiB, needed "
        f"{sum(partition.needed.values()) / MIB:.1f} MiB"
    )
    print(
        f"{'':18} {'archive MiB':>11} {'EMDB MiB':>9} {'API KiB':>8} {'total MiB':>9} "
        f"{'requests':>8} (arch/emdb/api/other) {'map.gz MiB':>10} {'files':>5} {'wall s':>7}"
    )
    for row in rows:
        b, q = row.bytes_by_host, row.requests_by_host
        split = f"{q['archive']}/{q['emdb_files']}/{q['api']}/{q['other']}"
        print(
            f"{row.label:18} {_mib(b['archive']):>11} {_mib(b['emdb_files']):>9} "
            f"{b['api'] / 1024:8.1f} {_mib(row.total_bytes):>9} {row.total_requests:8d} "
            f"{split:>21} {_mib(row.map_gz_bytes):>10} {row.files:5d} {row.wall_s:7.2f}"
        )
    r = ratios(rows)
    print(
        f"ours / wget -r: bytes {r['bytes']:.3f}, requests {r['requests']:.3f}, "
        f"time {r['time']:.3f}"
    )


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the mirror, serve it, measure every partition at every latency; the figures."""
    figures: dict[str, Any] = {"partitions": {}}
    with tempfile.TemporaryDirectory(prefix="dataset_fetch_") as tmp:
        root = Path(tmp) / "mirror"
        started = time.perf_counter()
        partitions = build_mirror(root, args)
        log(f"mirror written in {time.perf_counter() - started:.1f} s")
        for part in partitions:
            gz = sum(v for k, v in part.needed.items() if k.startswith("map/"))
            figures["partitions"][part.empiar_id] = {
                "kind": part.kind,
                "shape": part.shape,
                "emdb_id": part.emdb_id,
                "archive_folder_bytes": part.archive_bytes,
                "emdb_folder_bytes": part.emdb_bytes,
                "needed_bytes": sum(part.needed.values()),
                "map_gz_bytes": gz,
                "map_bytes": 1024 + 4 * args.map_box**3,
                "needed_files": sorted(part.needed),
                "by_latency_ms": {},
            }
        with serve(root) as server:
            traffic = count_traffic(server)
            for latency in args.latency_ms:
                server.faults.clear()
                if latency:
                    server.faults.append(Fault(".", "slow", delay_s=latency / 1000, times=-1))
                for part in partitions:
                    via = via_for(part, args.via)
                    rows = combine(
                        [
                            measure_partition(
                                server,
                                traffic,
                                part,
                                Path(tmp) / f"work_{latency:g}_{part.number}",
                                via=via,
                            )
                            for _ in range(args.repeat)
                        ]
                    )
                    if log is print:
                        print_table(part, latency, rows)
                    figures["partitions"][part.empiar_id]["by_latency_ms"][f"{latency:g}"] = {
                        "via": via,
                        "rows": [r.to_json() for r in rows],
                        "ours_over_wget": ratios(rows),
                    }
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--map-box", type=int, default=256, help="EMDB map box (voxels; float32)")
    p.add_argument("--box", type=int, default=128, help="particle box (px)")
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--stacks", type=int, default=4, help="particle stacks of the entry")
    p.add_argument("--micrographs", type=int, default=8, help="of the micrograph entry")
    p.add_argument("--px", type=int, default=1024, help="micrograph and movie frame side (px)")
    p.add_argument("--movies", type=int, default=4, help="movies each entry holds (not needed)")
    p.add_argument("--frames", type=int, default=16, help="frames per movie (8-bit)")
    p.add_argument("--pixel", type=float, default=1.34, help="pixel and voxel size (A)")
    p.add_argument(
        "--no-micrograph-entry",
        dest="micrograph_entry",
        action="store_false",
        help="measure the particle entry only",
    )
    p.add_argument(
        "--latency-ms",
        type=float,
        nargs="+",
        default=[0.0, 30.0],
        help="delays added to every reply (one table per value)",
    )
    p.add_argument(
        "--via",
        choices=("library", "fetch_stacks"),
        default="fetch_stacks",
        help="our fetch of a particle entry: corpus.build.fetch_stacks (which also checks the "
        "particles and writes its manifest), or the library calls alone (the micrograph entry "
        "always uses those: fetch_stacks would extract particles with RELION)",
    )
    p.add_argument("--repeat", type=int, default=3, help="measurements per row (median time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "dataset_fetch.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if shutil.which("wget") is None:
        print("wget is not installed: apt-get install -y wget", file=sys.stderr)
        return 1
    figures = run(args)
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_results(args.json, "dataset_fetch", arguments, figures)
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

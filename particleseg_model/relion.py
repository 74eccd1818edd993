"""Wrappers around the RELION 3.1 programs: extraction, 3D auto-refine, reconstruction, and
the accuracy of refined poses against known ones.

- :func:`run_relion` runs one RELION program (under ``mpirun`` when ``mpi`` ranks are asked
  for), streams its stdout/stderr lines to a callback as they come (a ``logging.Logger``, a
  Dagster ``context.log`` or any ``callable(str)``), writes a transcript, and on failure raises
  :class:`RelionError` carrying RELION's own error text and the command.
- :func:`extract_particles` runs ``relion_preprocess --extract`` on micrographs (a micrographs
  STAR file with optics and CTF, or a list of MRC files) and particle coordinates (RELION STAR
  ``rlnCoordinateX/Y`` or EMAN ``.box``, matched to micrographs by file name). It builds a
  RELION project directory: micrographs linked under their relative names, coordinates
  converted to STAR in the tree RELION 3.1 expects (``Coordinates/<micrograph path without
  extension>.star``), stacks in ``Particles/``, and ``particles.star`` whose image names are
  relative to that directory.
- :func:`auto_refine` runs ``mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves``
  from a reference map, with defaults that converge on the simulated datasets of
  :mod:`particleseg_model.simulate` (see :data:`REFINE_DEFAULTS`).
- :func:`reconstruct` runs ``relion_reconstruct`` (a map from given poses).
- :func:`pose_errors` / :func:`summarise_pose_errors`: angular error (the angle of
  ``R_refined^T R_true``, RELION ZYZ Euler angles) and shift error (Angstrom) per particle.

Units: boxes, radii and offsets named ``*_px`` are pixels, ``*_a`` Angstrom. Origins in STAR
tables are RELION 3.1 ``rlnOriginX/YAngst`` (canonical ``origin_x_a``/``origin_y_a``).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from particleseg_model.maps import (
    DensityMap,
    fourier_resample,
    load_map,
    make_mask,
    pad_or_crop,
    particle_diameter_px,
    write_mrc,
)
from particleseg_model.simulate import euler_matrices
from particleseg_model.star import write_loop_blocks

__all__ = [
    "MPI_PREFIX",
    "REFINE_DEFAULTS",
    "Extraction",
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

logger = logging.getLogger("particleseg.relion")

# Open MPI as root in a container needs --allow-run-as-root; --oversubscribe lets 3 ranks
# (1 leader + 2 workers) run on 2 cores.
MPI_PREFIX: tuple[str, ...] = ("mpirun", "--allow-run-as-root", "--oversubscribe")

LogTarget = Callable[[str], Any] | logging.Logger | Any | None

# RELION's text progress bar: "000/??? sec ~~(,_,">  [oo]" and rows of dots, no newline
_RAT = '~~(,_,">'
_BAR_CHARS = set(' 0123456789/?.~(,_">[]o:')
_ERROR_STOP = re.compile(r"^(=== Backtrace|in: |-{10,}|={10,}|Primary job|mpirun|MPI_ABORT"
                         r"|\[\w[\w.-]*:\d+\])")
# Open MPI's own diagnostics ("[host:pid] [[job,0],0] ORTE_ERROR_LOG: ...") are not RELION's error
_MPI_NOISE = re.compile(r"^\s*\[[\w.-]+:\d+\]|ORTE_ERROR_LOG|PMIX_ERROR|OPAL_ERROR")


# ------------------------------------------------------------------------------ running


class RelionError(RuntimeError):
    """A RELION program failed (or could not start). ``str()`` holds RELION's own error text,
    the exit status and the command; the attributes keep them apart."""

    def __init__(self, message: str, *, command: Sequence[str] = (), returncode: int | None = None,
                 error_text: str = "", stderr_tail: Sequence[str] = (), cwd: Path | None = None):
        super().__init__(message)
        self.command = list(command)
        self.returncode = returncode
        self.error_text = error_text
        self.stderr_tail = list(stderr_tail)
        self.cwd = cwd


@dataclass(frozen=True)
class RelionRun:
    """A finished RELION command: its exit status (0), wall time, and the last output lines
    (progress bars left out)."""

    command: list[str]
    cwd: Path
    returncode: int
    seconds: float
    stdout_tail: list[str]
    stderr_tail: list[str]


def relion_available(program: str = "relion_refine") -> bool:
    """Whether ``program`` (default ``relion_refine``) is on PATH."""
    return shutil.which(program) is not None


def _emitter(target: LogTarget, level: int = logging.INFO) -> Callable[[str], None]:
    """A ``str -> None`` from a logger (``logging.Logger``, Dagster's ``context.log``: anything
    with ``.info``) or a plain callable; None discards."""
    if target is None:
        return lambda line: None
    if isinstance(target, logging.Logger):
        return lambda line: target.log(level, "%s", line)
    info = getattr(target, "info", None)
    if callable(info):
        return lambda line: info(line)
    if callable(target):
        return target  # type: ignore[return-value]
    raise TypeError(f"log must be a callable or a logger, got {type(target).__name__}")


def _clean_line(line: str) -> str | None:
    """The text of an output line without RELION's progress bar; None when nothing is left."""
    if _RAT in line:
        line = line.rsplit(_RAT, 1)[1]
    text = line.rstrip()
    stripped = text.replace("sec", "").strip()
    if not stripped or set(stripped) <= _BAR_CHARS and (
            "..." in stripped or "[oo]" in stripped or "/" in stripped or set(stripped) == {"."}):
        return None
    return text


def relion_error_text(stderr: Sequence[str], stdout: Sequence[str] = ()) -> str:
    """RELION's own error message from a failed run's output: the lines after the last
    ``ERROR:`` line (RELION prints it before and after the backtrace), without backtrace and
    Open MPI's own messages (``ORTE_ERROR_LOG``, ``MPI_ABORT`` notes); else the last lines of
    stderr (or stdout)."""
    for lines in (stderr, stdout):
        lines = [line.rstrip() for line in lines if not _MPI_NOISE.search(line)]
        marks = [i for i, line in enumerate(lines) if "ERROR" in line]
        if not marks:
            continue
        found: list[str] = []
        # the last ERROR block; if it is empty (ERROR: on its own at the very end) an earlier one
        for start in reversed(marks):
            head = lines[start].split("ERROR", 1)[1].lstrip(":! ").strip()
            block = [head] if head else []
            for line in lines[start + 1:]:
                if "ERROR" in line or _ERROR_STOP.match(line.strip()):
                    break
                if line.strip():
                    block.append(line.strip())
            if block:
                found = block
                break
        if found:
            unique = list(dict.fromkeys(found))  # MPI ranks repeat the same message
            return "\n".join(unique[:20])
    tail = [line for line in (stderr or stdout) if line.strip()]
    return "\n".join(tail[-10:])


def run_relion(args: Sequence[str | os.PathLike], *, cwd: str | os.PathLike,
               log: LogTarget = None, mpi: int | None = None,
               transcript: str | os.PathLike | None = None, timeout_s: float | None = None,
               tick: Callable[[], Any] | None = None, env: dict[str, str] | None = None
               ) -> RelionRun:
    """Run a RELION program in ``cwd`` and stream its output lines to ``log`` as they come.

    Args:
        args: the program and its arguments (``["relion_preprocess", "--i", ...]``).
        cwd: the RELION project directory (relative paths in STAR files are relative to it).
        log: a ``logging.Logger`` (lines at INFO), anything with ``.info`` (Dagster's
            ``context.log``) or a ``callable(str)``; RELION's progress bars are left out.
        mpi: run under ``mpirun -n mpi`` (with :data:`MPI_PREFIX`); the program gets its
            ``_mpi`` variant when it is not named so.
        transcript: file that receives every stdout and stderr line (``[err]``-prefixed).
        timeout_s: kill the program (and its MPI ranks) after this many seconds.
        tick: called about twice a second while the program runs (progress polling).
    Returns:
        :class:`RelionRun` (exit status 0).
    Raises:
        RelionError: the program is not installed, exits non-zero or runs past ``timeout_s``;
            the message holds RELION's error text (:func:`relion_error_text`) and the command.
    """
    command = [str(a) for a in args]
    if not command:
        raise ValueError("no RELION program given")
    cwd = Path(cwd)
    if mpi is not None:
        if mpi < 1:
            raise ValueError(f"mpi ranks must be positive, got {mpi}")
        if not command[0].endswith("_mpi"):
            command[0] += "_mpi"
        command = [*MPI_PREFIX, "-n", str(int(mpi)), *command]
        if shutil.which("mpirun") is None:
            raise RelionError(f"mpirun not found on PATH (install Open MPI; RELION's Debian "
                              f"package brings it); command: {shlex.join(command)}",
                              command=command, cwd=cwd)
    program = command[len(MPI_PREFIX) + 2] if mpi is not None else command[0]
    if shutil.which(program) is None:
        raise RelionError(f"{program} not found on PATH: is RELION installed (apt-get install "
                          f"relion)? command: {shlex.join(command)}", command=command, cwd=cwd)
    if not cwd.is_dir():
        raise RelionError(f"working directory {cwd} does not exist; command: "
                          f"{shlex.join(command)}", command=command, cwd=cwd)
    emit = _emitter(log)
    full_env = {**os.environ, **(env or {})}
    # Open MPI in containers: no shared-memory single copy (CMA needs ptrace rights)
    full_env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    full_env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    stdout_tail: deque[str] = deque(maxlen=400)
    stderr_tail: deque[str] = deque(maxlen=400)
    lines: queue.Queue[tuple[str, str] | None] = queue.Queue()
    log_file = open(transcript, "a", encoding="utf-8") if transcript else None  # noqa: SIM115
    started = time.monotonic()
    logger.debug("running %s in %s", shlex.join(command), cwd)
    try:
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=full_env, start_new_session=True,
                                preexec_fn=_parent_death_signal())
    except OSError as exc:
        if log_file:
            log_file.close()
        raise RelionError(f"cannot start {program}: {exc}; command: {shlex.join(command)}",
                          command=command, cwd=cwd) from exc

    def reader(stream: Any, name: str) -> None:
        pending = b""
        try:
            while True:
                chunk = stream.read1(65536)
                if not chunk:
                    break
                pending += chunk
                *complete, pending = re.split(rb"[\r\n]", pending)
                for raw in complete:
                    lines.put((name, raw.decode("utf-8", errors="replace")))
            if pending:
                lines.put((name, pending.decode("utf-8", errors="replace")))
        finally:
            lines.put(None)

    threads = [threading.Thread(target=reader, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=reader, args=(proc.stderr, "err"), daemon=True)]
    for thread in threads:
        thread.start()
    open_streams, timed_out = 2, False
    last_tick = 0.0
    try:
        while open_streams:
            try:
                item = lines.get(timeout=0.5)
            except queue.Empty:
                item = ()  # type: ignore[assignment]
            now = time.monotonic()
            if tick is not None and now - last_tick >= 0.5:
                tick()
                last_tick = now
            if timeout_s is not None and now - started > timeout_s and not timed_out:
                timed_out = True
                _kill(proc)
            if item == ():
                continue
            if item is None:
                open_streams -= 1
                continue
            name, raw = item
            if log_file:
                log_file.write(("[err] " if name == "err" else "") + raw + "\n")
            text = _clean_line(raw)
            if text is None:
                continue
            (stderr_tail if name == "err" else stdout_tail).append(text)
            emit(text)
        proc.wait()
    except BaseException:
        _kill(proc)
        raise
    finally:
        for thread in threads:
            thread.join(timeout=5)
        if log_file:
            log_file.close()
    seconds = time.monotonic() - started
    if tick is not None:
        tick()
    if timed_out or proc.returncode != 0:
        error = relion_error_text(list(stderr_tail), list(stdout_tail))
        why = (f"ran past its time limit of {timeout_s:g} s" if timed_out
               else f"failed (exit status {proc.returncode})")
        message = f"{program} {why}"
        if error:
            message += f": {error}"
        message += f"\ncommand (in {cwd}): {shlex.join(command)}"
        raise RelionError(message, command=command, returncode=proc.returncode,
                          error_text=error, stderr_tail=list(stderr_tail)[-20:], cwd=cwd)
    return RelionRun(command=command, cwd=cwd, returncode=0, seconds=seconds,
                     stdout_tail=list(stdout_tail), stderr_tail=list(stderr_tail))


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send the program SIGTERM when the thread that started
    it dies: a run worker killed outright (SIGKILL, out of memory) takes mpirun and its ranks
    with it instead of leaving an orphan refinement writing on. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_signal() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call
            os.kill(os.getpid(), signal.SIGTERM)

    return set_signal


def _kill(proc: subprocess.Popen) -> None:
    """Terminate the program and its process group (mpirun's ranks), then kill if needed."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------ STAR helpers


def _read_blocks(path: Path) -> dict[str, Any]:
    try:
        return starfile.read(path, always_dict=True,
                             parse_as_string=["rlnMicrographName", "rlnImageName",
                                              "rlnOpticsGroupName"])
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as STAR: {exc}") from exc


# ------------------------------------------------------------------------------ extraction


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract_particles` made.

    ``particles_star`` has image names relative to ``project_dir``. ``box_px`` is the box cut
    from the micrographs; ``image_size_px`` the box of the written particles (``rescale_px``
    when rescaled); ``pixel_size_a`` theirs; ``bg_radius_px`` the normalisation radius in
    pixels of the written particles (None without normalisation).
    """

    particles_star: Path
    project_dir: Path
    n_particles: int
    n_micrographs: int
    box_px: int
    rescale_px: int | None
    image_size_px: int
    pixel_size_a: float
    micrograph_pixel_size_a: float
    normalise: bool
    invert_contrast: bool
    bg_radius_px: int | None
    skipped_micrographs: tuple[str, ...] = ()
    command: tuple[str, ...] = ()


_COORD_EXTRA = ("rlnAutopickFigureOfMerit", "rlnClassNumber", "rlnAnglePsi")


def _read_coordinates(path: Path) -> pd.DataFrame:
    """Coordinates of one micrograph as RELION reads them (``rlnCoordinateX/Y``: box centre,
    pixels) from a RELION STAR file or an EMAN ``.box`` file (lower-left corner, width,
    height: centre = corner + size / 2)."""
    if path.suffix.lower() == ".box":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            try:
                x, y, w, h = (float(v) for v in (words + ["0", "0"])[:4])
            except ValueError:
                raise ValueError(f"{path}, line {number}: not an EMAN .box row "
                                 f"(x y width height): {line!r}") from None
            if len(words) < 4 or w <= 0 or h <= 0:
                raise ValueError(f"{path}, line {number}: an EMAN .box row needs x, y and a "
                                 f"positive width and height: {line!r}")
            rows.append((x + w / 2, y + h / 2))
        return pd.DataFrame(rows, columns=["rlnCoordinateX", "rlnCoordinateY"], dtype=float)
    blocks = _read_blocks(path)
    for block in blocks.values():
        if isinstance(block, dict):
            block = pd.DataFrame([block])
        if "rlnCoordinateX" in block and "rlnCoordinateY" in block:
            keep = ["rlnCoordinateX", "rlnCoordinateY", *[c for c in _COORD_EXTRA if c in block]]
            table = block[keep].copy()
            table[["rlnCoordinateX", "rlnCoordinateY"]] = table[
                ["rlnCoordinateX", "rlnCoordinateY"]].astype(float)
            return table.reset_index(drop=True)
    if not blocks:  # an empty coordinate file (a micrograph without picks)
        return pd.DataFrame(columns=["rlnCoordinateX", "rlnCoordinateY"], dtype=float)
    raise ValueError(f"{path}: no block with rlnCoordinateX and rlnCoordinateY")


def _coordinate_index(coordinates: str | os.PathLike | Iterable[str | os.PathLike]
                      ) -> list[Path]:
    if isinstance(coordinates, str | os.PathLike):
        root = Path(coordinates)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file()
                           and p.suffix.lower() in (".star", ".box"))
            if not files:
                raise FileNotFoundError(f"{root}: no coordinate files (.star or .box) in it")
            return files
        if not root.is_file():
            raise FileNotFoundError(f"{root}: coordinate directory or file not found")
        return [root]
    files = [Path(p) for p in coordinates]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"coordinate files not found: {', '.join(missing[:5])}")
    return files


def _match_coordinates(stem: str, files: list[Path], suffix: str | None) -> Path | None:
    """The coordinate file of the micrograph named ``stem``: ``stem + suffix`` when a suffix is
    given, else ``stem.star``, ``stem.box``, or a single ``stem_*.star`` / ``stem_*.box``
    (``_autopick.star``, ``_manualpick.star``, ...); STAR wins over .box."""
    if suffix is not None:
        hits = [p for p in files if p.name == stem + suffix]
    else:
        hits = [p for p in files if p.name in (stem + ".star", stem + ".box")]
        if not hits:
            hits = [p for p in files if p.name.startswith(stem + "_")]
    if not hits:
        return None
    stars = [p for p in hits if p.suffix.lower() == ".star"]
    hits = stars or hits
    if len(hits) > 1:
        raise ValueError(f"several coordinate files match micrograph {stem!r}: "
                         f"{', '.join(str(p) for p in hits[:4])}; pass coord_suffix to choose")
    return hits[0]


def _micrograph_table(micrographs: str | os.PathLike | Sequence[str | os.PathLike],
                      pixel_size_a: float | None, voltage_kv: float, cs_mm: float,
                      amplitude_contrast: float) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """(optics block, micrographs block with absolute ``_source`` paths, base directory)."""
    if isinstance(micrographs, str | os.PathLike) and Path(micrographs).suffix == ".star":
        path = Path(micrographs)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: micrographs STAR file not found")
        blocks = _read_blocks(path)
        table = next((b for b in blocks.values() if isinstance(b, pd.DataFrame)
                      and "rlnMicrographName" in b), None)
        if table is None:
            raise ValueError(f"{path}: no block with rlnMicrographName")
        table = table.reset_index(drop=True).copy()
        optics = blocks.get("optics")
        if isinstance(optics, dict):
            optics = pd.DataFrame([optics])
        base = path.parent
    else:
        items = ([micrographs] if isinstance(micrographs, str | os.PathLike)
                 else list(micrographs))
        if not items:
            raise ValueError("no micrographs given")
        table = pd.DataFrame({"rlnMicrographName": [str(p) for p in items]})
        optics = None
        base = Path.cwd()
    sources = []
    for name in table["rlnMicrographName"].astype(str):
        source = Path(name) if Path(name).is_absolute() else base / name
        if not source.is_file():
            raise FileNotFoundError(f"micrograph {name} not found (looked for {source})")
        sources.append(source.resolve())
    table["_source"] = sources
    if optics is None or "rlnMicrographPixelSize" not in optics:
        pixel = pixel_size_a
        if pixel is None:
            pixel = _mrc_pixel(sources[0])  # the header's voxel size
        if not pixel or pixel <= 0:
            raise ValueError(f"{sources[0]}: no pixel size in the header; pass pixel_size_a")
        group = {"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1",
                 "rlnMicrographOriginalPixelSize": float(pixel), "rlnVoltage": voltage_kv,
                 "rlnSphericalAberration": cs_mm, "rlnAmplitudeContrast": amplitude_contrast,
                 "rlnMicrographPixelSize": float(pixel)}
        if optics is not None and len(optics) > 0:  # keep what a 3.1 optics block gives
            merged = optics.iloc[[0]].to_dict("records")[0]
            group.update({k: v for k, v in merged.items() if k in group})
        optics = pd.DataFrame([group])
        table["rlnOpticsGroup"] = 1
    elif "rlnOpticsGroup" not in table:
        table["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    return optics.reset_index(drop=True), table, base


def _mrc_pixel(path: Path) -> float:
    import mrcfile

    with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
        return float(mrc.voxel_size.x)


def _project_name(name: str, source: Path) -> str:
    """The micrograph's name inside the project: its relative name when it has one without
    '..', else ``Micrographs/<file name>``."""
    path = Path(name)
    if not path.is_absolute() and ".." not in path.parts:
        return path.as_posix()
    return f"Micrographs/{source.name}"


def extract_particles(micrographs: str | os.PathLike | Sequence[str | os.PathLike],
                      coordinates: str | os.PathLike | Iterable[str | os.PathLike],
                      out_dir: str | os.PathLike, *, box_px: int,
                      rescale_px: int | None = None, invert_contrast: bool = True,
                      normalise: bool = True, bg_radius_px: int | None = None,
                      coord_suffix: str | None = None, pixel_size_a: float | None = None,
                      voltage_kv: float = 300.0, cs_mm: float = 2.7,
                      amplitude_contrast: float = 0.1, overwrite: bool = False,
                      progress: bool | None = None, log: LogTarget = None,
                      timeout_s: float | None = None) -> Extraction:
    """Extract particles with ``relion_preprocess --extract`` into the project ``out_dir``.

    Args:
        micrographs: a micrographs STAR file (RELION 3.1 with ``data_optics``, e.g. a CTF
            estimation's output; names relative to the file's directory) or a list of MRC
            micrographs (one optics group from ``pixel_size_a`` or the first header, with
            ``voltage_kv``/``cs_mm``/``amplitude_contrast``; no CTF columns).
        coordinates: a directory (searched recursively) or a list of coordinate files, RELION
            STAR (``rlnCoordinateX/Y``: box centre, 0-based pixels) or EMAN ``.box``
            (lower-left corner, width, height). A micrograph's file is ``<stem><coord_suffix>``,
            by default ``<stem>.star``, ``<stem>.box`` or one ``<stem>_*.star|box``.
            Micrographs without a coordinate file are skipped (listed in the result).
        out_dir: the project directory to create (refused if it exists, unless ``overwrite``);
            built under a temporary name and renamed into place, so a failure leaves nothing.
        box_px: box cut from the micrographs (even, pixels).
        rescale_px: rescale the particles to this box (``--scale``, even), or None.
        invert_contrast: ``--invert_contrast`` (raw micrographs have dark particles).
        normalise: ``--norm``: background (outside ``bg_radius_px``, default 37.5% of the final
            box, RELION's GUI default) to mean 0, std 1 after removing a fitted ramp.
        progress: a bar over micrographs (stacks written); None shows it on a terminal only.
        log: where RELION's output lines go (see :func:`run_relion`).
    Returns:
        :class:`Extraction`.
    Raises:
        RelionError: relion_preprocess failed (RELION's message and the command).
        FileNotFoundError, ValueError: missing micrographs/coordinates, bad sizes, no particle.
    """
    if box_px < 8 or box_px % 2:
        raise ValueError(f"box_px {box_px} must be even and at least 8")
    if rescale_px is not None and (rescale_px < 8 or rescale_px % 2):
        raise ValueError(f"rescale_px {rescale_px} must be even and at least 8")
    final_box = rescale_px or box_px
    if normalise:
        radius = int(bg_radius_px) if bg_radius_px is not None else int(round(0.375 * final_box))
        if not 0 < radius < final_box // 2:
            raise ValueError(f"bg_radius_px {radius} must be in (0, {final_box // 2})")
    else:
        radius = None
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    emit = _emitter(log)

    optics, table, _ = _micrograph_table(micrographs, pixel_size_a, voltage_kv, cs_mm,
                                         amplitude_contrast)
    files = _coordinate_index(coordinates)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        names, keep, skipped, seen = [], [], [], set()
        for row, (name, source) in enumerate(zip(table["rlnMicrographName"].astype(str),
                                                 table["_source"], strict=True)):
            rel = _project_name(name, source)
            if rel in seen:
                raise ValueError(f"two micrographs map to {rel} in the project")
            seen.add(rel)
            coord_file = _match_coordinates(source.stem, files, coord_suffix)
            if coord_file is None:
                skipped.append(name)
                continue
            coords = _read_coordinates(coord_file)
            if len(coords) == 0:
                skipped.append(name)
                continue
            link = tmp / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
            # RELION 3.1: coordinates of "Micrographs/x.mrc" are <coord_dir>Micrographs/x<suffix>
            write_loop_blocks(tmp / "Coordinates" / (rel.rsplit(".", 1)[0] + ".star"),
                               {"": coords})
            names.append(rel)
            keep.append(row)
        if not keep:
            raise ValueError(f"no micrograph has particle coordinates (looked in "
                             f"{len(files)} files for {len(table)} micrographs)")
        if skipped:
            emit(f"{len(skipped)} micrographs have no coordinates and are skipped: "
                 f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
        mics = table.iloc[keep].drop(columns="_source").reset_index(drop=True)
        mics["rlnMicrographName"] = names
        write_loop_blocks(tmp / "micrographs.star", {"optics": optics, "micrographs": mics})
        command = ["relion_preprocess", "--i", "micrographs.star", "--coord_dir",
                   "Coordinates/", "--coord_suffix", ".star", "--part_dir", "Particles/",
                   "--part_star", "particles.star", "--extract", "--extract_size", str(box_px)]
        if rescale_px is not None and rescale_px != box_px:
            command += ["--scale", str(rescale_px)]
        if normalise:
            command += ["--norm", "--bg_radius", str(radius)]
        if invert_contrast:
            command += ["--invert_contrast"]

        from particleseg_model.progress import progress as progress_bar

        bar = progress_bar(total=len(names), desc="extract", unit="mic",
                           disable=None if progress is None else not progress)

        def tick() -> None:
            done = sum(1 for _ in (tmp / "Particles").rglob("*.mrcs")) \
                if (tmp / "Particles").is_dir() else 0
            if done > bar.n:
                bar.update(done - bar.n)

        try:
            run_relion(command, cwd=tmp, log=log, transcript=tmp / "extract.log", tick=tick,
                       timeout_s=timeout_s)
        finally:
            bar.close()
        star_path = tmp / "particles.star"
        if not star_path.is_file():
            raise RelionError(f"relion_preprocess wrote no particles.star in {tmp}",
                              command=command, cwd=tmp)
        blocks = _read_blocks(star_path)
        parts = blocks.get("particles")
        n = 0 if parts is None or isinstance(parts, dict) else len(parts)
        if n == 0:
            raise ValueError(f"relion_preprocess extracted no particle from {len(names)} "
                             "micrographs")
        mic_pixel = float(optics["rlnMicrographPixelSize"].iloc[0])
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final_pixel = mic_pixel * box_px / final_box
    return Extraction(particles_star=out / "particles.star", project_dir=out, n_particles=n,
                      n_micrographs=len(names), box_px=box_px,
                      rescale_px=rescale_px if rescale_px != box_px else None,
                      image_size_px=final_box, pixel_size_a=final_pixel,
                      micrograph_pixel_size_a=mic_pixel, normalise=normalise,
                      invert_contrast=invert_contrast, bg_radius_px=radius,
                      skipped_micrographs=tuple(skipped), command=tuple(command))


# ------------------------------------------------------------------------------ refinement


# Defaults of auto_refine (see its docstring for why they converge on simulated data): a few
# hundred particles at 64 px in minutes on 2 cores. ini_lowpass_a None: from the particle size.
REFINE_DEFAULTS: dict[str, Any] = {
    "ini_lowpass_a": None,
    "healpix_order": 2,
    "local_healpix_order": 4,
    "offset_range_px": 5.0,
    "offset_step_px": 2.0,
    "mpi_ranks": 3,
    "threads": 1,
    "pool_size": 10,
    "firstiter_cc": True,
    "norm_correction": True,
    "scale_correction": True,
    "flatten_solvent": True,
    "zero_mask": True,
    "low_resol_join_halves_a": 40.0,
}
# initial low-pass = particle diameter / LOWPASS_DIVISOR, within [LOWPASS_MIN_PX px, 60 A]
LOWPASS_DIVISOR = 4.0
LOWPASS_MIN_PX = 6.0
LOWPASS_MAX_A = 60.0


@dataclass(frozen=True)
class ReferenceGeometry:
    """Sizes taken from a reference map: the particle's diameter (largest extent of the map
    above its contour level, low-passed to 15 A, as :func:`~particleseg_model.maps.make_mask`
    thresholds it), the diameter of its MaskCreate-style mask (extended 3 px, soft edge 6 px,
    at mask level 0.5: RELION's ``--particle_diameter``), and the initial low-pass."""

    pixel_size_a: float
    body_diameter_a: float
    mask_diameter_a: float
    ini_lowpass_a: float


def default_ini_lowpass_a(diameter_a: float, pixel_size_a: float) -> float:
    """The initial low-pass for a particle of ``diameter_a``: a quarter of the diameter (four
    resolution elements across the particle, so the reference still shows its domains; 60 A
    for a 240 A ribosome as RELION's tutorial uses), at least 6 px (3x Nyquist), at most 60 A."""
    return float(min(max(diameter_a / LOWPASS_DIVISOR, LOWPASS_MIN_PX * pixel_size_a),
                     LOWPASS_MAX_A))


def reference_geometry(density: DensityMap) -> ReferenceGeometry:
    """:class:`ReferenceGeometry` of a map (its contour: the molecular volume when the map
    knows it, else :func:`~particleseg_model.maps.auto_threshold`). A map already low-passed
    far below its detail reads larger than the particle is."""
    pixel = density.pixel_size_a
    body, _ = make_mask(density, extend_px=0.0, soft_edge_px=0.0)
    mask, _ = make_mask(density)
    body_a = particle_diameter_px(body) * pixel
    mask_a = particle_diameter_px(mask) * pixel
    return ReferenceGeometry(pixel_size_a=pixel, body_diameter_a=body_a, mask_diameter_a=mask_a,
                             ini_lowpass_a=default_ini_lowpass_a(body_a, pixel))


@dataclass(frozen=True)
class Refinement:
    """What :func:`auto_refine` made: the refined particles (``data_star``), the final map
    (``map_path``: RELION's ``run_class001.mrc``), the unfiltered half maps, the model STAR, the
    final resolution (Angstrom, gold-standard FSC 0.143 without masking), the iterations run and
    the wall time. ``converged`` is False when ``max_iterations`` stopped it first: the paths are
    then those of the last iteration (``map_path`` the average of its half maps)."""

    data_star: Path
    map_path: Path
    half_maps: tuple[Path, Path]
    model_star: Path
    resolution_a: float
    iterations: int
    seconds: float
    particle_diameter_a: float
    ini_lowpass_a: float
    converged: bool
    command: tuple[str, ...]
    out_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)


def _particle_optics(particles_star: Path) -> tuple[float, int]:
    """(pixel size, box) of the particles from the STAR file's optics block."""
    blocks = _read_blocks(particles_star)
    optics = blocks.get("optics")
    if isinstance(optics, dict):
        optics = pd.DataFrame([optics])
    if optics is None or "rlnImagePixelSize" not in optics or "rlnImageSize" not in optics:
        raise ValueError(f"{particles_star}: needs a RELION 3.1 optics block with "
                         "rlnImagePixelSize and rlnImageSize")
    pixels = optics["rlnImagePixelSize"].astype(float).unique()
    boxes = optics["rlnImageSize"].astype(int).unique()
    if len(boxes) > 1:
        raise ValueError(f"{particles_star}: optics groups with different boxes {list(boxes)}")
    return float(pixels[0]), int(boxes[0])


def _match_reference(density: DensityMap, pixel: float, box: int) -> DensityMap:
    """The reference on the particles' grid (pixel size and box), by Fourier resampling and
    padding/cropping around the centre voxel."""
    data = density.data
    if abs(density.pixel_size_a - pixel) > 1e-3 * pixel:
        size = 2 * max(4, round(data.shape[0] * density.pixel_size_a / pixel / 2))
        data = fourier_resample(data, size)
    if data.shape[0] != box:
        data = pad_or_crop(data, box)
    return DensityMap(data=data, pixel_size_a=pixel, source=density.source,
                      volume_a3=density.volume_a3)


def _final_resolution(lines: Sequence[str], model_star: Path) -> float:
    for line in reversed(lines):
        match = re.search(r"Final resolution.*?is:\s*([0-9.]+)", line)
        if match:
            return float(match.group(1))
    blocks = _read_blocks(model_star)
    general = blocks.get("model_general")
    if isinstance(general, pd.DataFrame):
        general = general.iloc[0].to_dict()
    if isinstance(general, dict) and "rlnCurrentResolution" in general:
        return float(general["rlnCurrentResolution"])
    raise ValueError(f"{model_star}: no rlnCurrentResolution in data_model_general")


def auto_refine(particles_star: str | os.PathLike, reference_map: str | os.PathLike | DensityMap,
                out_dir: str | os.PathLike, *, particle_diameter_a: float | None = None,
                ini_lowpass_a: float | None = REFINE_DEFAULTS["ini_lowpass_a"],
                symmetry: str = "C1",
                healpix_order: int = REFINE_DEFAULTS["healpix_order"],
                local_healpix_order: int = REFINE_DEFAULTS["local_healpix_order"],
                offset_range_px: float = REFINE_DEFAULTS["offset_range_px"],
                offset_step_px: float = REFINE_DEFAULTS["offset_step_px"],
                mpi_ranks: int = REFINE_DEFAULTS["mpi_ranks"],
                threads: int = REFINE_DEFAULTS["threads"], ctf: bool = True,
                pool_size: int = REFINE_DEFAULTS["pool_size"],
                firstiter_cc: bool = REFINE_DEFAULTS["firstiter_cc"],
                norm_correction: bool = REFINE_DEFAULTS["norm_correction"],
                scale_correction: bool = REFINE_DEFAULTS["scale_correction"],
                flatten_solvent: bool = REFINE_DEFAULTS["flatten_solvent"],
                zero_mask: bool = REFINE_DEFAULTS["zero_mask"],
                low_resol_join_halves_a: float | None =
                REFINE_DEFAULTS["low_resol_join_halves_a"],
                solvent_mask: str | os.PathLike | None = None, preread_images: bool = True,
                random_seed: int | None = 0,
                max_iterations: int | None = None, project_dir: str | os.PathLike | None = None,
                extra_args: Sequence[str] = (), log: LogTarget = None,
                timeout_s: float | None = None) -> Refinement:
    """3D auto-refine (gold-standard, split random halves) of ``particles_star`` from
    ``reference_map``, under ``mpirun -n mpi_ranks relion_refine_mpi``.

    The defaults (:data:`REFINE_DEFAULTS`) are RELION's GUI choices for a refinement from a
    reference that is not on the particles' grey scale, with the initial low-pass and mask
    taken from the reference (measured on simulated data, ``benchmarks/refine_accuracy.py``):

    - ``--ini_high`` = :func:`default_ini_lowpass_a`: a quarter of the particle diameter
      (:func:`reference_geometry`), 18-60 A for the demo maps. A fixed 40-60 A fails on small
      particles: a 74 A particle at 2.4 A/px low-passed to 40 A is a featureless blob and
      the first iterations assign random poses that never recover (median error 110 deg at
      40 A and 30 A, converging at 20 A);
    - ``--firstiter_cc``: the first iteration scores by cross-correlation, since the reference
      is not on the absolute grey scale of the normalised particles; later ones are ML;
    - ``--healpix_order 2`` (15 degrees, 7.5 after oversampling) global searches, local ones
      from ``--auto_local_healpix_order 4`` (3.75 degrees) on, RELION's default. The global
      3.75-degree iterations are most of the run time (about 80%); ``local_healpix_order=3``
      is about 5x faster but leaves about 10% of the particles in a wrong view (EMD-1832,
      400 particles at 64 px: 87% vs 96% within 5 degrees);
    - ``--offset_range 5 --offset_step 2`` pixels: simulated and picked particles sit within
      a few pixels of the box centre; oversampling halves the step and auto-refine refines it;
    - ``--flatten_solvent --zero_mask`` with ``--particle_diameter`` the diameter of the
      reference's MaskCreate-style mask: noise and ice texture outside the particle do not
      pull the alignment;
    - ``--norm --scale`` (GUI default), ``--low_resol_join_halves 40`` (the halves share the
      low resolution so that they do not diverge into different hands or positions),
      ``--pad 2``, ``--dont_combine_weights_via_disc``, ``--preread_images`` (small sets).

    Input origins (``rlnOriginX/YAngst``) are the centre of RELION's offset search: strip them
    (and the angles) from a STAR whose poses must not leak into the test.

    Args:
        particles_star: RELION 3.1 particle STAR (optics with pixel size and box; CTF columns
            when ``ctf``); image names relative to ``project_dir`` (default: the STAR file's
            directory, as :func:`extract_particles` writes it).
        reference_map: a map file or :class:`~particleseg_model.maps.DensityMap`, in the frame
            the poses should come out in.
        out_dir: output directory (created); files ``run_*`` as RELION names them.
        particle_diameter_a: RELION's mask diameter; default from the reference's mask.
        ini_lowpass_a: ``--ini_high``; default :func:`default_ini_lowpass_a` of the reference.
        solvent_mask: a mask for the references and the FSC (``--solvent_mask
            --solvent_correct_fsc``); default RELION's spherical mask.
        log: where RELION's output lines go (see :func:`run_relion`).
        random_seed: ``--random_seed`` (the random half split and noise); the default 0 makes
            a rerun reproducible, None lets RELION seed from the clock.
        max_iterations: ``--auto_iter_max`` (stop there even if not converged).
    Returns:
        :class:`Refinement` with the paths of ``run_data.star``, ``run_class001.mrc``, ...
    Raises:
        RelionError: the refinement failed or ran past ``timeout_s``.
    """
    if mpi_ranks < 3:
        raise ValueError("auto-refine with split random halves needs at least 3 MPI ranks "
                         f"(a leader and one per half), got {mpi_ranks}")
    particles_star = Path(particles_star).resolve()
    if not particles_star.is_file():
        raise FileNotFoundError(f"{particles_star}: particle STAR file not found")
    project = Path(project_dir).resolve() if project_dir else particles_star.parent
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pixel, box = _particle_optics(particles_star)
    density = reference_map if isinstance(reference_map, DensityMap) else load_map(reference_map)
    density = _match_reference(density, pixel, box)
    reference = write_mrc(out / "reference.mrc", density.data, pixel)
    if particle_diameter_a is None or ini_lowpass_a is None:
        geometry = reference_geometry(density)
        if particle_diameter_a is None:
            particle_diameter_a = geometry.mask_diameter_a
        if ini_lowpass_a is None:
            ini_lowpass_a = geometry.ini_lowpass_a
    diameter = float(min(particle_diameter_a, (box - 2) * pixel))
    command = ["relion_refine", "--o", str(out / "run"), "--auto_refine",
               "--split_random_halves", "--i", str(particles_star), "--ref", str(reference),
               "--ini_high", f"{ini_lowpass_a:g}", "--particle_diameter", f"{diameter:.1f}",
               "--sym", symmetry, "--healpix_order", str(healpix_order),
               "--auto_local_healpix_order", str(local_healpix_order),
               "--offset_range", f"{offset_range_px:g}", "--offset_step", f"{offset_step_px:g}",
               "--oversampling", "1", "--pad", "2", "--j", str(threads), "--pool",
               str(pool_size), "--dont_combine_weights_via_disc"]
    if preread_images:
        command.append("--preread_images")
    if random_seed is not None:
        command += ["--random_seed", str(int(random_seed))]
    if ctf:
        command.append("--ctf")
    if firstiter_cc:
        command.append("--firstiter_cc")
    if norm_correction:
        command.append("--norm")
    if scale_correction:
        command.append("--scale")
    if flatten_solvent:
        command.append("--flatten_solvent")
    if zero_mask:
        command.append("--zero_mask")
    if low_resol_join_halves_a:
        command += ["--low_resol_join_halves", f"{low_resol_join_halves_a:g}"]
    if solvent_mask is not None:
        command += ["--solvent_mask", str(Path(solvent_mask).resolve()), "--solvent_correct_fsc"]
    if max_iterations is not None:
        command += ["--auto_iter_max", str(int(max_iterations))]
    command += [str(a) for a in extra_args]
    run = run_relion(command, cwd=project, log=log, mpi=mpi_ranks,
                     transcript=out / "run.log", timeout_s=timeout_s)
    data_star, map_path = out / "run_data.star", out / "run_class001.mrc"
    model_star = out / "run_model.star"
    half_maps = (out / "run_half1_class001_unfil.mrc", out / "run_half2_class001_unfil.mrc")
    done = sorted(out.glob("run_it[0-9][0-9][0-9]_data.star"))
    iterations = max(0, len(done) - 1)  # it000 is the input
    converged = data_star.is_file() and map_path.is_file()
    if not converged:
        if max_iterations is None or not done:
            raise RelionError(f"relion_refine finished without {data_star.name} / "
                              f"{map_path.name} in {out}; see {out / 'run.log'}",
                              command=run.command, cwd=project)
        last = done[-1].name[: len("run_itNNN")]
        data_star = out / f"{last}_data.star"
        model_star = out / f"{last}_half1_model.star"
        half_maps = (out / f"{last}_half1_class001.mrc", out / f"{last}_half2_class001.mrc")
        halves = [load_map(h).data for h in half_maps]
        map_path = write_mrc(out / f"{last}_class001_average.mrc", (halves[0] + halves[1]) / 2,
                             pixel)
    settings = {"ini_lowpass_a": ini_lowpass_a, "symmetry": symmetry,
                "healpix_order": healpix_order, "local_healpix_order": local_healpix_order,
                "offset_range_px": offset_range_px, "offset_step_px": offset_step_px,
                "mpi_ranks": mpi_ranks, "threads": threads, "ctf": ctf,
                "firstiter_cc": firstiter_cc, "norm": norm_correction, "scale": scale_correction,
                "flatten_solvent": flatten_solvent, "zero_mask": zero_mask,
                "low_resol_join_halves_a": low_resol_join_halves_a, "pool_size": pool_size,
                "random_seed": random_seed}
    resolution = _final_resolution(run.stdout_tail if converged else [], model_star)
    return Refinement(
        data_star=data_star, map_path=map_path, half_maps=half_maps, model_star=model_star,
        resolution_a=resolution, iterations=iterations, seconds=run.seconds,
        particle_diameter_a=diameter, ini_lowpass_a=float(ini_lowpass_a), converged=converged,
        command=tuple(run.command), out_dir=out, settings=settings)


def reconstruct(particles_star: str | os.PathLike, out_map: str | os.PathLike, *,
                ctf: bool = True, symmetry: str = "C1", max_resolution_a: float | None = None,
                project_dir: str | os.PathLike | None = None, log: LogTarget = None,
                timeout_s: float | None = None) -> Path:
    """A map from the particles at their poses (``relion_reconstruct``): a quick check of a
    pose set. ``max_resolution_a`` limits it (``--maxres``)."""
    particles_star = Path(particles_star).resolve()
    if not particles_star.is_file():
        raise FileNotFoundError(f"{particles_star}: particle STAR file not found")
    project = Path(project_dir).resolve() if project_dir else particles_star.parent
    out_map = Path(out_map).resolve()
    out_map.parent.mkdir(parents=True, exist_ok=True)
    command = ["relion_reconstruct", "--i", str(particles_star), "--o", str(out_map),
               "--sym", symmetry]
    if ctf:
        command.append("--ctf")
    if max_resolution_a is not None:
        command += ["--maxres", f"{max_resolution_a:g}"]
    run_relion(command, cwd=project, log=log, timeout_s=timeout_s)
    if not out_map.is_file():
        raise RelionError(f"relion_reconstruct wrote no {out_map}", command=command, cwd=project)
    return out_map


# ------------------------------------------------------------------------------ pose accuracy


def _key(table: pd.DataFrame, on: Sequence[str]) -> pd.Series:
    missing = [c for c in on if c not in table]
    if missing:
        raise KeyError(f"pose table lacks the matching columns {missing}")
    parts = []
    for column in on:
        values = table[column]
        if pd.api.types.is_numeric_dtype(values):
            values = values.astype(float).round(3).map(repr)
        else:
            values = values.astype(str).str.strip()
        parts.append(values)
    key = parts[0]
    for extra in parts[1:]:
        key = key + "|" + extra
    return key


def pose_errors(refined: pd.DataFrame, truth: pd.DataFrame,
                on: str | Sequence[str] = "image_name") -> pd.DataFrame:
    """Per-particle pose errors of ``refined`` against ``truth`` (both with rot_deg, tilt_deg,
    psi_deg, origin_x_a, origin_y_a: the canonical table of :func:`~particleseg_model.star.
    read_star`, or a simulator ground-truth table), matched on ``on`` (default the image
    name; e.g. ``("micrograph_name", "coordinate_x_px", "coordinate_y_px")`` for particles
    extracted from simulated micrographs). Rows of ``truth`` without a pose (NaN: junk) and
    rows without a match are left out.

    Returns a table indexed like the matched ``refined`` rows with the key columns and
    ``angle_error_deg`` (rotation angle of ``R_refined^T R_true``, RELION ZYZ Euler matrices,
    0..180), ``shift_error_a`` (distance between the origins, Angstrom), ``shift_x_a``,
    ``shift_y_a`` (refined minus true).
    """
    keys = [on] if isinstance(on, str) else list(on)
    columns = ["rot_deg", "tilt_deg", "psi_deg", "origin_x_a", "origin_y_a"]
    for name, table in (("refined", refined), ("truth", truth)):
        missing = [c for c in columns if c not in table]
        if missing:
            raise KeyError(f"{name} table lacks pose columns {missing}")
    true = truth[columns].astype(float)
    true = true[np.isfinite(true.to_numpy()).all(axis=1)]
    true_key = _key(truth.loc[true.index], keys)
    if true_key.duplicated().any():
        raise ValueError(f"truth has duplicate keys on {keys}, e.g. "
                         f"{true_key[true_key.duplicated()].iloc[0]!r}")
    lookup = pd.Series(np.arange(len(true)), index=true_key.to_numpy())
    ref_key = _key(refined, keys)
    found = ref_key.isin(lookup.index).to_numpy()
    ref = refined.loc[found, columns].astype(float)
    rows = lookup.loc[ref_key[found].to_numpy()].to_numpy()
    t = true.iloc[rows]
    r_ref = euler_matrices(ref["rot_deg"], ref["tilt_deg"], ref["psi_deg"])
    r_true = euler_matrices(t["rot_deg"], t["tilt_deg"], t["psi_deg"])
    trace = np.einsum("nji,nji->n", r_ref, r_true)  # trace(R_ref^T R_true)
    angle = np.degrees(np.arccos(np.clip((trace - 1) / 2, -1.0, 1.0)))
    dx = ref["origin_x_a"].to_numpy() - t["origin_x_a"].to_numpy()
    dy = ref["origin_y_a"].to_numpy() - t["origin_y_a"].to_numpy()
    out = refined.loc[found, keys].copy()
    out["angle_error_deg"] = angle
    out["shift_error_a"] = np.hypot(dx, dy)
    out["shift_x_a"] = dx
    out["shift_y_a"] = dy
    return out


def summarise_pose_errors(errors: pd.DataFrame, within_deg: float = 5.0) -> dict[str, float]:
    """Summary of a :func:`pose_errors` table: ``n_particles``, ``median_angle_error_deg``,
    ``mean_angle_error_deg``, ``fraction_within_deg`` (share with an angular error of at most
    ``within_deg``, recorded too), ``median_shift_error_a``, ``mean_shift_error_a``."""
    angle = errors["angle_error_deg"].to_numpy(dtype=float)
    shift = errors["shift_error_a"].to_numpy(dtype=float)
    n = len(errors)
    nan = math.nan
    return {
        "n_particles": float(n),
        "median_angle_error_deg": float(np.median(angle)) if n else nan,
        "mean_angle_error_deg": float(np.mean(angle)) if n else nan,
        "within_deg": float(within_deg),
        "fraction_within_deg": float(np.mean(angle <= within_deg)) if n else nan,
        "median_shift_error_a": float(np.median(shift)) if n else nan,
        "mean_shift_error_a": float(np.mean(shift)) if n else nan,
    }

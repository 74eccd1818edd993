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
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import starfile

__all__ = [
    "MPI_PREFIX",
    "RelionError",
    "RelionRun",
    "relion_available",
    "relion_error_text",
    "run_relion",
]

logger = logging.getLogger("particleseg.relion")

# Open MPI as root in a container needs --allow-run-as-root; --oversubscribe lets 3 ranks
# (1 leader + 2 workers) run on 2 cores.
MPI_PREFIX: tuple[str, ...] = ("mpirun", "--allow-run-as-root", "--oversubscribe")

LogTarget = Callable[[str], Any] | logging.Logger | Any | None

# RELION's text progress bar: "000/??? sec ~~(,_,">  [oo]" and rows of dots, no newline
_RAT = '~~(,_,">'
_BAR_CHARS = set(' 0123456789/?.~(,_">[]o:')
_ERROR_STOP = re.compile(
    r"^(=== Backtrace|in: |-{10,}|={10,}|Primary job|mpirun|MPI_ABORT"
    r"|\[\w[\w.-]*:\d+\])"
)
# Open MPI's own diagnostics ("[host:pid] [[job,0],0] ORTE_ERROR_LOG: ...") are not RELION's error
_MPI_NOISE = re.compile(r"^\s*\[[\w.-]+:\d+\]|ORTE_ERROR_LOG|PMIX_ERROR|OPAL_ERROR")


# ------------------------------------------------------------------------------ running


class RelionError(RuntimeError):
    """A RELION program failed (or could not start). ``str()`` holds RELION's own error text,
    the exit status and the command; the attributes keep them apart."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        returncode: int | None = None,
        error_text: str = "",
        stderr_tail: Sequence[str] = (),
        cwd: Path | None = None,
    ):
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


def _emitter(target: LogTarget, level: int = logging.INFO) -> Callable[[str], object]:
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
    if (
        not stripped
        or set(stripped) <= _BAR_CHARS
        and ("..." in stripped or "[oo]" in stripped or "/" in stripped or set(stripped) == {"."})
    ):
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
            for line in lines[start + 1 :]:
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


def run_relion(  # noqa: C901 - to split (pyproject: mccabe)
    args: Sequence[str | os.PathLike],
    *,
    cwd: str | os.PathLike,
    log: LogTarget = None,
    mpi: int | None = None,
    transcript: str | os.PathLike | None = None,
    timeout_s: float | None = None,
    tick: Callable[[], Any] | None = None,
    env: dict[str, str] | None = None,
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
            raise RelionError(
                f"mpirun not found on PATH (install Open MPI; RELION's Debian "
                f"package brings it); command: {shlex.join(command)}",
                command=command,
                cwd=cwd,
            )
    program = command[len(MPI_PREFIX) + 2] if mpi is not None else command[0]
    if shutil.which(program) is None:
        raise RelionError(
            f"{program} not found on PATH: is RELION installed (apt-get install "
            f"relion)? command: {shlex.join(command)}",
            command=command,
            cwd=cwd,
        )
    if not cwd.is_dir():
        raise RelionError(
            f"working directory {cwd} does not exist; command: {shlex.join(command)}",
            command=command,
            cwd=cwd,
        )
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
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )
    except OSError as exc:
        if log_file:
            log_file.close()
        raise RelionError(
            f"cannot start {program}: {exc}; command: {shlex.join(command)}",
            command=command,
            cwd=cwd,
        ) from exc

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

    threads = [
        threading.Thread(target=reader, args=(proc.stdout, "out"), daemon=True),
        threading.Thread(target=reader, args=(proc.stderr, "err"), daemon=True),
    ]
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
            name, raw = item  # pyright: ignore[reportAssignmentType] - () and None skipped above
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
        why = (
            f"ran past its time limit of {timeout_s:g} s"
            if timed_out
            else f"failed (exit status {proc.returncode})"
        )
        message = f"{program} {why}"
        if error:
            message += f": {error}"
        message += f"\ncommand (in {cwd}): {shlex.join(command)}"
        raise RelionError(
            message,
            command=command,
            returncode=proc.returncode,
            error_text=error,
            stderr_tail=list(stderr_tail)[-20:],
            cwd=cwd,
        )
    return RelionRun(
        command=command,
        cwd=cwd,
        returncode=0,
        seconds=seconds,
        stdout_tail=list(stdout_tail),
        stderr_tail=list(stderr_tail),
    )


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
        # always_dict=True: a dict of blocks (starfile's return type also allows one block)
        return starfile.read(  # pyright: ignore[reportReturnType]
            path,
            always_dict=True,
            parse_as_string=["rlnMicrographName", "rlnImageName", "rlnOpticsGroupName"],
        )
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as STAR: {exc}") from exc

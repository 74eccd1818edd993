"""What ``segment`` and ``clean`` read and write, checked before the long run.

One set of rules for both commands (and the platform's cleaning asset):

- :func:`read_paths`: every file a run reads: the particle STAR file, every particle stack it
  names (found as the run finds them), the model's ``model.keras`` and ``manifest.json``.
- :func:`check_outputs`: no output is, or would replace, any of those (whatever
  ``--overwrite`` says), no two outputs are the same file, an existing output needs
  ``overwrite``, and each output's folder exists and takes a new file (a read-only or
  unwritable folder is found before the run, not after it).
- :func:`check_one_box`: the particles have one box: every optics group the same
  ``rlnImageSize``, every stack's images that size. The model runs at one box; a set with
  several is refused up front with the groups and stacks named (split it by optics group),
  never cleaned by counting the other boxes "unreadable".
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from particleseg_model.em.mrc import MrcError, open_stack
from particleseg_model.em.star import StarError

__all__ = [
    "INPUT_STAR",
    "check_one_box",
    "check_space",
    "check_outputs",
    "check_writable",
    "read_paths",
    "stack_files",
]

INPUT_STAR = "the input STAR file"


def stack_files(particles: pd.DataFrame, base_dir: Path) -> dict[Path, np.ndarray]:
    """Each stack file of a canonical particle table (``stack_path`` joined to ``base_dir`` as
    :func:`~particleseg_model.em.mrc.read_particles` does) and the 0-based rows naming it."""
    out: dict[Path, np.ndarray] = {}
    paths = particles["stack_path"].astype(str).to_numpy()
    for stack in pd.unique(paths):
        file = Path(stack)
        out[file if file.is_absolute() else base_dir / file] = np.flatnonzero(paths == stack)
    return out


def read_paths(
    star: Path, particles: pd.DataFrame, base_dir: Path, model_folder: Path | None
) -> dict[Path, str]:
    """Every file a run reads: the STAR file, its stacks, the model's files.

    Parameters
    ----------
    star
        The particle STAR file.
    particles
        Its canonical table (:func:`~particleseg_model.em.star.read_star`).
    base_dir
        Where the stacks' relative paths start.
    model_folder
        The model version's local folder (its ``model.keras`` and ``manifest.json``), or None.

    Returns
    -------
    dict
        Each file to what it is ("the input STAR file", "a particle stack of the input",
        "the model's model.keras", ...), for the messages.
    """
    paths = {star: INPUT_STAR}
    paths.update(
        {file: "a particle stack of the input" for file in stack_files(particles, base_dir)}
    )
    if model_folder is not None:
        for name in ("model.keras", "manifest.json"):
            paths[model_folder / name] = f"the model's {name}"
    return paths


def _same(a: Path, b: Path) -> bool:
    """The same file: equal resolved paths (a file to be created), or one inode (links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(folder: Path, what: str) -> None:
    """Refuse a folder that does not exist or cannot take a new file (read-only, no
    permission), by creating and removing a hidden file there.

    Parameters
    ----------
    folder
        The folder an output goes to.
    what
        The option naming the output ("--out"), for the message.

    Raises
    ------
    FileNotFoundError
        No such folder.
    PermissionError
        The folder cannot take a new file (its errno kept: EROFS, EACCES, ...).
    """
    if not folder.is_dir():
        raise FileNotFoundError(2, f"no such folder for {what}", str(folder))
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".particleseg-probe-"):
            pass
    except OSError as exc:
        raise PermissionError(
            exc.errno,
            f"cannot write {what} here ({exc.strerror or exc}); nothing was run",
            str(folder),
        ) from None


def check_space(path: Path, need_bytes: int, what: str) -> None:
    """Refuse a run whose outputs cannot fit: ``need_bytes`` (an estimate, in bytes) more than
    the free space of the file system of ``path``'s folder.

    Parameters
    ----------
    path
        An output (its folder is measured).
    need_bytes
        What the outputs will take, about.
    what
        The options naming the outputs, for the message.

    Raises
    ------
    OSError
        ``ENOSPC``, naming ``path``.
    """
    import errno
    import shutil

    free = shutil.disk_usage(path.parent).free
    if free < need_bytes:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: {what} need about {need_bytes:,} bytes, "
            f"{free:,} are free there; nothing was run",
            str(path),
        )


def check_outputs(
    outputs: Mapping[str, Path],
    reads: Mapping[Path, str],
    *,
    overwrite: bool = False,
    folders: bool = True,
) -> None:
    """Refuse outputs that would destroy an input, collide, or replace a file unasked.

    Parameters
    ----------
    outputs
        Option (``"--out"``, ``"--scores"``, ``"--report"``...) to the file it writes.
    reads
        Every file the run reads, to what it is (:func:`read_paths`): never written,
        whatever ``overwrite`` says.
    overwrite
        Replace existing outputs.
    folders
        Check that each output's folder exists and is writable (:func:`check_writable`).

    Raises
    ------
    ValueError
        An output is an input, or two outputs are the same file.
    FileExistsError
        An output exists and ``overwrite`` is false.
    FileNotFoundError, PermissionError
        As :func:`check_writable`, for an output's folder.
    """
    items = list(outputs.items())
    for what, path in items:
        for read, role in reads.items():
            if _same(path, read):
                raise ValueError(
                    f"{path}: {what} is {role} ({read}), which this run reads; an input is "
                    "never overwritten, even with --overwrite: choose another name"
                )
    for i, (what, path) in enumerate(items):
        for other, second in items[i + 1 :]:
            if _same(path, second):
                raise ValueError(f"{path}: {what} and {other} need different names")
    if not overwrite:
        for what, path in items:
            if path.exists():
                raise FileExistsError(f"{path} exists: choose another {what} or remove it")
    if folders:
        folders_of: dict[Path, str] = {}
        for what, path in items:
            folders_of.setdefault(path.parent.resolve(), what)  # named by its first output
        for folder, what in folders_of.items():
            check_writable(folder, what)


def _groups_text(boxes: pd.Series, groups: pd.Series) -> str:
    parts = []
    for group, box in sorted(boxes.groupby(groups).first().items()):
        count = int((groups == group).sum())
        parts.append(f"group {group}: {box} px, {count} particles")
    return "; ".join(parts)


def check_one_box(star: Path, particles: pd.DataFrame, base_dir: Path) -> int | None:
    """The particles' one box in pixels; refuse a set with several.

    The box of a particle is its optics group's ``rlnImageSize`` when the file gives one, and
    its stack's image size; both must be one value over the whole set. Stacks that cannot be
    opened are left to the run (each of their rows is unreadable, or stops the run).

    Parameters
    ----------
    star
        The STAR file (for the message).
    particles
        Its canonical table.
    base_dir
        Where the stacks' relative paths start.

    Returns
    -------
    int or None
        The box, or None when no stack opens and the file gives no ``rlnImageSize``.

    Raises
    ------
    StarError
        Optics groups with different ``rlnImageSize``; a stack whose images are another size
        than its particles' ``rlnImageSize``; stacks of different sizes; non-square images.
    """
    sizes = particles["image_size_px"]
    groups = particles["optics_group"]
    known = sizes.notna().to_numpy()
    declared = sorted({int(v) for v in sizes[known]})
    if len(declared) > 1:
        raise StarError(
            f"{star}: the optics groups have different boxes "
            f"({_groups_text(sizes[known], groups[known])}); "
            "a model runs at one box: split the file by rlnOpticsGroup (relion_star_handler "
            "--select rlnOpticsGroup --minval G --maxval G) and run each part"
        )
    box = declared[0] if declared else None
    first: tuple[Path, int] | None = None
    for file, rows in stack_files(particles, base_dir).items():
        try:
            shape = open_stack(file).shape[1:]
        except MrcError:
            continue
        if shape[0] != shape[1]:
            raise StarError(
                f"{file}: particle images are {shape[1]} x {shape[0]} pixels, not square"
            )
        size = int(shape[0])
        if box is not None and size != box:
            raise StarError(
                f"{file}: images are {size} x {size} px, but rlnImageSize of its particles "
                f"(STAR rows {rows[0] + 1}-{rows[-1] + 1} of {star}) is {box}"
            )
        if first is not None and size != first[1]:
            raise StarError(
                f"{star}: the stacks have different boxes ({first[0]}: {first[1]} px; {file}: "
                f"{size} px); a model runs at one box: split the file by stack or optics group"
            )
        first = first or (file, size)
    return box if box is not None else (first[1] if first else None)

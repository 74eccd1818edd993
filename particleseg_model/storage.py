"""Storage roots: local paths, ``file://`` URLs and other fsspec URLs (``s3://``, ``gs://``,
``memory://``), and the local work directory that goes with a remote root.

The Zarr corpus (:mod:`particleseg_model.corpus.store`) and the model registry
(:mod:`particleseg_model.model.registry`) accept any of them. What must be a local file (RELION
working directories, downloaded stacks, MRC maps, the Keras file being loaded) lives in the
work directory: ``$PARTICLESEG_WORK``, default ``./data/work``. Only a remote root uses it; with
a local root the platform keeps everything under the root as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

WORK_ENV = "PARTICLESEG_WORK"
DEFAULT_WORK = "data/work"


def is_remote(root: str | os.PathLike[str]) -> bool:
    """True for an fsspec URL other than ``file://`` (which is a local path)."""
    text = os.fspath(root)
    return "://" in text and not text.startswith("file:")


def local_path(root: str | os.PathLike[str]) -> Path:
    """The local path of a plain path or ``file://`` URL (ValueError for a remote URL)."""
    text = os.fspath(root)
    if text.startswith("file:"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL on another host: {text}")
        return Path(url2pathname(unquote(parts.path)))
    if is_remote(text):
        raise ValueError(f"{text} is not a local path")
    return Path(text)


def join(root: str | os.PathLike[str], *parts: str) -> str:
    """``root/part/...`` as a string: a URL stays a URL (``Path`` would fold its ``//``)."""
    text = os.fspath(root)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(text).joinpath(*parts)) if parts else text


def work_dir() -> Path:
    """The local work directory for a remote root (``$PARTICLESEG_WORK``, default
    ``./data/work``), absolute."""
    return Path(os.environ.get(WORK_ENV) or DEFAULT_WORK).expanduser().resolve()

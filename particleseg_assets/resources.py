"""Resources configured from the environment: EMPIAR/EMDB/archive clients, storage root,
RELION (where its programs are, how many MPI ranks and threads a refinement gets)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydantic
from dagster import ConfigurableResource

from particleseg_model.access.empiar import (
    EmdbClient,
    EmpiarClient,
    archive_url,
    emdb_files_url,
    emdb_url,
    empiar_url,
)
from particleseg_model.storage import is_remote, join, local_path, work_dir

DATA_ENV = "PARTICLESEG_DATA"


class DescribedResource(ConfigurableResource):
    """A resource whose field docstrings are the launchpad's descriptions (Dagster shows a
    pydantic field's description only)."""

    model_config = pydantic.ConfigDict(use_attribute_docstrings=True)


class EmpiarResource(DescribedResource):
    """EMPIAR, EMDB and archive endpoints. Unset URLs fall back to ``PARTICLESEG_*_URL`` at
    run time, so one definition serves EBI, a local mirror and the loopback test server."""

    empiar_url: str | None = None
    """The EMPIAR API (empty: PARTICLESEG_EMPIAR_URL, else EBI's)."""
    emdb_url: str | None = None
    """The EMDB API (empty: PARTICLESEG_EMDB_URL, else EBI's)."""
    archive_url: str | None = None
    """The EMPIAR file archive (empty: PARTICLESEG_ARCHIVE_URL, else EBI's FTP over HTTPS)."""
    emdb_files_url: str | None = None
    """EMDB's file tree, where the maps are (empty: PARTICLESEG_EMDB_FILES_URL, else EBI's)."""
    retries: int | None = None
    """Retries of a failed request, with backoff (empty: PARTICLESEG_HTTP_RETRIES, else 5)."""
    timeout_s: float = 30.0
    """Seconds a request may wait for the server."""
    polite_delay_s: float = 0.05
    """Seconds between two requests to the same server."""

    def _options(self) -> dict:
        return {
            "retries": self.retries,
            "timeout_s": self.timeout_s,
            "polite_delay_s": self.polite_delay_s,
        }

    def empiar(self) -> EmpiarClient:
        return EmpiarClient(
            self.empiar_url or empiar_url(), self.emdb_url or emdb_url(), **self._options()
        )

    def emdb(self) -> EmdbClient:
        return EmdbClient(self.emdb_url or emdb_url(), **self._options())

    def archive(self) -> str:
        return self.archive_url or archive_url()

    def emdb_files(self) -> str:
        """The root of EMDB's file tree (``structures/EMD-<n>/...``); EBI by default."""
        return self.emdb_files_url or emdb_files_url()


class StorageResource(DescribedResource):
    """The storage root of every asset (``PARTICLESEG_DATA``, default ``./data``): a local
    path or an fsspec URL (``s3://bucket/particleseg``, ``gs://...``, ``memory://...``,
    ``file://...``).

    The Zarr corpus and the model registry live under the root whatever it is (:meth:`url`,
    :meth:`corpus_root`, :meth:`models_root`). Everything else needs local files (RELION
    working directories, downloaded stacks, MRC maps, the per-partition manifests, reports,
    figures, the catalog Parquet files) and goes under :meth:`path`: the root itself when it
    is local (nothing moves), else the local work directory ``PARTICLESEG_WORK`` (default
    ``./data/work``; the model registry caches downloaded versions there too)."""

    root: str | None = None
    """Where every asset is stored: a folder or an fsspec URL (empty: PARTICLESEG_DATA, else
    ./data)."""

    def _root(self) -> str:
        return self.root or os.environ.get(DATA_ENV) or "data"

    def remote(self) -> bool:
        """Whether the root is an fsspec URL other than ``file://``."""
        return is_remote(self._root())

    def base(self) -> Path:
        """The local directory of :meth:`path`: the root, or the work directory of a remote
        root."""
        if self.remote():
            return work_dir()
        return local_path(self._root()).resolve()

    def path(self, *parts: str) -> Path:
        """A local path (RELION work, downloads, manifests, reports; see the class doc)."""
        return self.base().joinpath(*parts)

    def url(self, *parts: str) -> str:
        """A location under the root as a string: a URL for a remote root, else the same
        local path as :meth:`path` (for the corpus and the model registry)."""
        root = self._root()
        return join(root, *parts) if is_remote(root) else str(self.path(*parts))

    def corpus_root(self) -> str:
        """The Zarr corpus (``<root>/corpus``)."""
        return self.url("corpus")

    def models_root(self) -> str:
        """The model registry (``<root>/models``)."""
        return self.url("models")

    def catalog_path(self) -> Path:
        return self.path("catalog", "empiar_entries.parquet")

    def eligible_path(self) -> Path:
        return self.path("catalog", "eligible_entries.parquet")


RELION_BIN_ENV = "PARTICLESEG_RELION_BIN"
RELION_MPI_ENV = "PARTICLESEG_RELION_MPI_RANKS"
RELION_THREADS_ENV = "PARTICLESEG_RELION_THREADS"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{name}={value} must be at least 1")
    return value


class RelionResource(DescribedResource):
    """How RELION runs here. Unset fields fall back to ``PARTICLESEG_RELION_BIN`` (a directory
    put first on PATH, for a RELION built from source), ``PARTICLESEG_RELION_MPI_RANKS``
    (default 3: a leader and one rank per half-set) and ``PARTICLESEG_RELION_THREADS``
    (default 1 per rank: 3 ranks x 1 thread already fill a 2-core host)."""

    bin_dir: str | None = None
    """A folder put first on PATH for RELION's programs (empty: PARTICLESEG_RELION_BIN)."""
    mpi_ranks: int | None = None
    """MPI ranks of a refinement (empty: PARTICLESEG_RELION_MPI_RANKS, else 3)."""
    threads: int | None = None
    """Threads per rank (empty: PARTICLESEG_RELION_THREADS, else 1)."""

    def ranks(self) -> int:
        return self.mpi_ranks or _env_int(RELION_MPI_ENV, 3)

    def threads_per_rank(self) -> int:
        return self.threads or _env_int(RELION_THREADS_ENV, 1)

    def program_dir(self) -> Path | None:
        text = self.bin_dir or os.environ.get(RELION_BIN_ENV)
        return Path(text).expanduser().resolve() if text else None

    @contextmanager
    def on_path(self) -> Iterator[None]:
        """Put :meth:`program_dir` first on PATH for the RELION calls inside the block."""
        where = self.program_dir()
        if where is None:
            yield
            return
        if not where.is_dir():
            raise FileNotFoundError(f"{RELION_BIN_ENV}/bin_dir {where} is not a directory")
        before = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{where}{os.pathsep}{before}"
        try:
            yield
        finally:
            os.environ["PATH"] = before

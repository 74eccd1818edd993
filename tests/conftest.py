"""Shared fixtures: the real data beside the project, and a loopback EMPIAR-compatible server."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Fast retries for tests that inject faults: the behaviour is the same, the waits are not.
FAST_HTTP = {"retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5.0}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not present ({SHARED_DATA}): real-data tests need it")
    return SHARED_DATA


@pytest.fixture
def fixture_mirror(tmp_path: Path):
    from particleseg_model.access.fixtures import write_fixture_mirror

    return write_fixture_mirror(tmp_path / "mirror")


@pytest.fixture
def archive_server(fixture_mirror) -> Iterator:
    """The embedded fixture catalog served on a free loopback port."""
    from particleseg_model.access.server import serve

    with serve(fixture_mirror.root) as server:
        yield server


@pytest.fixture
def server_env(archive_server, monkeypatch, tmp_path: Path):
    """Clients, storage and Dagster pointed at the loopback server and a temporary data root."""
    for name, value in archive_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PARTICLESEG_DATA", str(tmp_path / "data"))
    return archive_server


@pytest.fixture(scope="module")
def particle_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-entry demo archive (30001 globular, 30002 ring) of :data:`helpers.N_PARTICLES`
    particles each at box 48, for the runs of a whole deployment (test_dagster_e2e,
    test_faults)."""
    from helpers import N_PARTICLES

    from particleseg_model.simulation.demo_archive import write_demo_archive

    out = tmp_path_factory.mktemp("e2e") / "archive"
    write_demo_archive(
        out,
        maps=["generated:globular", "generated:ring"],
        n_particles=N_PARTICLES,
        box=48,
        micrograph_entries=0,
        seed=11,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def relion_bin() -> Path:
    found = shutil.which("relion_project")
    if not found:
        pytest.skip("RELION is not installed (apt-get install -y relion; `make setup` does it)")
    return Path(found).parent


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch) -> Path:
    """A persistent Dagster instance in a temporary DAGSTER_HOME (SQLite)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    repo_yaml = Path(__file__).resolve().parents[1] / "dagster_home" / "dagster.yaml"
    shutil.copy(repo_yaml, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


# Tests that need RELION or a PostgreSQL server get the mark from the fixture they take, so that
# `make test-fast` (-m "not relion and not postgres and not slow") leaves them out without each
# test having to repeat the mark.
_MARK_OF_FIXTURE = {
    "relion_bin": "relion",
    "postgres_server": "postgres",
    "postgres_home": "postgres",
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        for fixture, mark in _MARK_OF_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(mark)


def pytest_report_header(config) -> list[str]:
    return [
        f"shared data: {SHARED_DATA if SHARED_DATA.is_dir() else 'absent (tests skip)'}",
        f"RELION: {shutil.which('relion_project') or 'absent (tests skip)'}",
        f"DAGSTER_HOME: {os.environ.get('DAGSTER_HOME', 'unset')}",
    ]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL server from the Debian binaries on a free loopback port (one per
    test session; each test gets its own database from :func:`postgres_home`)."""
    from particleseg_assets.postgres import find_postgres_bin, local_postgres

    if find_postgres_bin() is None:
        pytest.skip(
            "PostgreSQL is not installed (apt-get install -y postgresql; "
            "`make setup` does it as root)"
        )
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 missing: pip install -e '.[postgres]'")
    with local_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def postgres_home(postgres_server, tmp_path: Path, monkeypatch) -> Path:
    """A Dagster instance on its own fresh PostgreSQL database, configured by the repository's
    ``dagster_home/postgres/dagster.yaml`` through the PG* variables."""
    import uuid

    database = postgres_server.create_database(f"dagster_{uuid.uuid4().hex[:12]}")
    for name, value in postgres_server.env(database).items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "dagster_home_pg"
    home.mkdir()
    repo_yaml = Path(__file__).resolve().parents[1] / "dagster_home" / "postgres" / "dagster.yaml"
    shutil.copy(repo_yaml, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home

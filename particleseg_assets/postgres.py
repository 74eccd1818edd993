"""A throwaway PostgreSQL server on loopback, from the Debian binaries (``apt-get install -y
postgresql``), for the tests and benchmarks of the PostgreSQL instance storage and for trying
``dagster_home/postgres/dagster.yaml`` on one machine. A real deployment points the ``PG*``
variables at its own server instead.

The server runs with ``fsync=off`` (a scratch cluster: durability is the deployment's server's
business) and trust authentication on 127.0.0.1 only. PostgreSQL refuses to run as root, so
as root the cluster belongs to the ``postgres`` user the Debian package creates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PG_BIN_ENV = "PARTICLESEG_PG_BIN"


def find_postgres_bin() -> Path | None:
    """The directory with ``initdb`` and ``pg_ctl``: ``PARTICLESEG_PG_BIN``, else Debian's
    ``/usr/lib/postgresql/<newest>/bin``, else ``initdb`` on PATH; None when there is none."""
    if os.environ.get(PG_BIN_ENV):
        where = Path(os.environ[PG_BIN_ENV])
        return where if (where / "initdb").exists() else None
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass(frozen=True)
class PostgresServer:
    """A running server: where it listens and who may connect (trust: no password checked)."""

    host: str
    port: int
    user: str = "postgres"
    password: str = "postgres"

    def env(self, database: str = "postgres") -> dict[str, str]:
        """The ``PG*`` variables ``dagster_home/postgres/dagster.yaml`` reads."""
        return {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGPASSWORD": self.password,
            "PGDATABASE": database,
        }

    def create_database(self, name: str) -> str:
        """Create an empty database (one per Dagster instance) and return its name."""
        import psycopg2

        conn = psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname="postgres",
        )
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str], owner: str | None, log: Path | None = None) -> None:
    command = ["runuser", "-u", owner, "--", *args] if owner else args
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        tail = log.read_text()[-2000:] if log and log.exists() else ""
        raise RuntimeError(
            f"{' '.join(args[:2])} failed ({done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}\n{tail}"
        )


@contextmanager
def local_postgres(
    workdir: str | os.PathLike[str], *, port: int | None = None, bin_dir: Path | None = None
) -> Iterator[PostgresServer]:
    """Start a fresh cluster in ``workdir`` on 127.0.0.1:``port`` (a free port by default),
    yield it, stop it (fast shutdown) on exit. Raises FileNotFoundError when PostgreSQL is not
    installed, RuntimeError naming the failing program otherwise."""
    bin_dir = bin_dir or find_postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError(
            "PostgreSQL is not installed: apt-get install -y postgresql "
            f"(or set {PG_BIN_ENV} to the directory with initdb)"
        )
    workdir = Path(workdir).resolve()
    data, log = workdir / "pgdata", workdir / "postgres.log"
    workdir.mkdir(parents=True, exist_ok=True)
    owner = None
    if os.geteuid() == 0:
        owner = "postgres"
        try:
            record = pwd.getpwnam(owner)
        except KeyError:
            raise RuntimeError(
                "running as root and there is no 'postgres' user to own the "
                "cluster (the Debian package creates it)"
            ) from None
        # the postgres user must reach the directory: every parent needs search permission
        for parent in [workdir, *workdir.parents]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o001)
        os.chown(workdir, record.pw_uid, record.pw_gid)
    port = port or _free_port()
    _run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        owner,
    )
    options = f"-h 127.0.0.1 -p {port} -k {workdir} -c fsync=off -c full_page_writes=off"
    _run(
        [
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
        owner,
        log,
    )
    try:
        server = PostgresServer("127.0.0.1", port)
        _wait_ready(server, log)
        yield server
    finally:
        subprocess.run(
            (["runuser", "-u", owner, "--"] if owner else [])
            + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )


def _wait_ready(server: PostgresServer, log: Path, timeout_s: float = 30) -> None:
    import psycopg2

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            psycopg2.connect(
                host=server.host,
                port=server.port,
                user=server.user,
                dbname="postgres",
                connect_timeout=2,
            ).close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL did not accept connections in {timeout_s} s:\n"
                    f"{log.read_text()[-2000:] if log.exists() else ''}"
                ) from None
            time.sleep(0.2)

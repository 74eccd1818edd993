"""Resources configured from the environment: EMPIAR/EMDB/archive clients, storage root."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource

from particleseg_model.empiar import EmdbClient, EmpiarClient, archive_url, emdb_url, empiar_url

DATA_ENV = "PARTICLESEG_DATA"


class EmpiarResource(ConfigurableResource):
    """EMPIAR, EMDB and archive endpoints. Unset URLs fall back to ``PARTICLESEG_*_URL`` at
    run time, so one definition serves EBI, a local mirror and the loopback test server."""

    empiar_url: str | None = None
    emdb_url: str | None = None
    archive_url: str | None = None
    retries: int | None = None  # None: PARTICLESEG_HTTP_RETRIES, default 5
    timeout_s: float = 30.0
    polite_delay_s: float = 0.05

    def _options(self) -> dict:
        return {"retries": self.retries, "timeout_s": self.timeout_s,
                "polite_delay_s": self.polite_delay_s}

    def empiar(self) -> EmpiarClient:
        return EmpiarClient(self.empiar_url or empiar_url(), self.emdb_url or emdb_url(),
                            **self._options())

    def emdb(self) -> EmdbClient:
        return EmdbClient(self.emdb_url or emdb_url(), **self._options())

    def archive(self) -> str:
        return self.archive_url or archive_url()


class StorageResource(ConfigurableResource):
    """The storage root of every asset (``PARTICLESEG_DATA``, default ``./data``)."""

    root: str | None = None

    def base(self) -> Path:
        return Path(self.root or os.environ.get(DATA_ENV) or "data").resolve()

    def path(self, *parts: str) -> Path:
        return self.base().joinpath(*parts)

    def catalog_path(self) -> Path:
        return self.path("catalog", "empiar_entries.parquet")

    def eligible_path(self) -> Path:
        return self.path("catalog", "eligible_entries.parquet")

"""Progress bars for long loops and downloads (tqdm, with rate and ETA).

``PARTICLESEG_PROGRESS=0`` turns every bar off, ``PARTICLESEG_PROGRESS=1`` turns every bar on
(logs of a batch job, a notebook); otherwise a bar shows only when stderr is a terminal, so that
Dagster logs and CI output stay free of carriage-return noise.

A bar is usable before its size is known::

    bar = progress(total=None, desc="EMDB resolutions", unit="map")
    bar.total = n
    bar.update(k)
    bar.close()
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

__all__ = ["ENV_VAR", "Bar", "enabled", "progress"]

ENV_VAR = "PARTICLESEG_PROGRESS"

_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}


def enabled(disable: bool | None = None) -> bool:
    """Whether a bar shows: the environment variable wins, then ``disable``, then the TTY test."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in _OFF:
        return False
    if forced in _ON:
        return True
    if disable is not None:
        return not disable
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class Bar(tqdm):
    """tqdm that keeps counting when disabled, so ``bar.n`` is right whether it shows or not."""

    def update(self, n: float | None = 1) -> bool | None:
        if self.disable:
            self.n += 1 if n is None else n
            return None
        return super().update(n)


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
    disable: bool | None = None,
    **kwargs: Any,
) -> Bar:
    """A tqdm bar on stderr; ``disable=None`` shows it only on a terminal (see the module doc).

    Extra keyword arguments (``initial``, ``leave``, ``unit_divisor``, ...) go to tqdm. A
    disabled bar still counts (``bar.n``, ``bar.total``) and still iterates ``iterable``.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.2)
    return Bar(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=not enabled(disable),
        **kwargs,
    )

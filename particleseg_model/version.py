"""The code version recorded in every corpus and model manifest."""

from __future__ import annotations

__all__ = ["code_version"]


def code_version() -> str:
    """``"particleseg <version>"`` of the installed distribution."""
    try:
        from importlib.metadata import version

        return f"particleseg {version('particleseg')}"
    except Exception:  # pragma: no cover - not installed
        return "particleseg (not installed)"

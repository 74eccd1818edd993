"""Progress bars: on a terminal only, forced on or off by PARTICLESEG_PROGRESS."""

from __future__ import annotations

import io
import sys

import pytest

from particleseg_model.progress import ENV_VAR, enabled, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_shown_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress(total=3).disable is True
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress(total=3, desc="maps")
    assert bar.disable is False
    bar.update(3)
    bar.close()
    assert "maps" in terminal.getvalue() and "3/3" in terminal.getvalue()


@pytest.mark.parametrize(
    ("value", "disable", "shown"),
    [
        ("0", None, False),
        ("0", False, False),
        ("off", False, False),
        ("1", None, True),
        ("1", True, True),
        ("yes", None, True),
        ("", None, False),
        ("", False, True),
        ("", True, False),
    ],
)
def test_environment_wins_over_argument_and_tty(monkeypatch, value, disable, shown):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    monkeypatch.setenv(ENV_VAR, value)
    assert enabled(disable) is shown
    bar = progress(total=1, disable=disable, file=io.StringIO())
    assert bar.disable is (not shown)
    bar.close()


def test_bar_shows_rate_and_eta(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    out = io.StringIO()
    bar = progress(total=4 << 20, desc="p.mrcs", unit="B", unit_scale=True, file=out, mininterval=0)
    bar.update(1 << 20)
    bar.update(3 << 20)
    bar.close()
    text = out.getvalue()
    assert "p.mrcs" in text and "100%" in text
    assert "B/s" in text  # rate
    assert "<" in text  # elapsed<remaining


def test_total_set_later_and_disabled_bar_still_counts(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")
    bar = progress(total=None, desc="EMDB resolutions", unit="map")
    assert bar.total is None
    bar.total = 10
    for done in (2, 5, 10):  # the catalog callback: update by the difference
        bar.update(done - bar.n)
    assert (bar.n, bar.total) == (10, 10)
    bar.close()


def test_iterable_passes_through(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    out = io.StringIO()
    bar = progress(["a", "b", "c"], desc="files", file=out)
    assert bar.total == 3
    assert list(bar) == ["a", "b", "c"]
    assert "3/3" in out.getvalue()
    monkeypatch.setenv(ENV_VAR, "0")
    assert list(progress(iter(range(4)))) == [0, 1, 2, 3]

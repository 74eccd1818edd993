"""The HTTP client: retries, backoff, Retry-After, polite delay and typed errors, on loopback."""

from __future__ import annotations

import socket
import time

import pytest

from particleseg_model.access.http import (
    BadPayloadError,
    HttpClient,
    NotFoundError,
    RateLimitedError,
    ServerError,
)
from particleseg_model.access.server import Fault


def client(server, **options) -> HttpClient:
    settings = {"retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5.0}
    settings.update(options)
    return HttpClient(server.empiar_url, **settings)


def test_url_joins_paths_and_keeps_absolute_urls():
    http = HttpClient("http://example.org/empiar/api/")
    assert http.url("entry/10028") == "http://example.org/empiar/api/entry/10028"
    assert http.url("/entry/10028") == "http://example.org/empiar/api/entry/10028"
    assert http.url("https://other.org/x") == "https://other.org/x"


def test_get_json_returns_the_entry(archive_server):
    http = client(archive_server)
    reply = http.get_json("entry/10028")
    assert list(reply) == ["EMPIAR-10028"]
    assert reply["EMPIAR-10028"]["cross_references"] == [{"name": "EMD-2660"}]
    assert http.requests_made == 1


def test_retry_after_is_honoured(archive_server):
    archive_server.faults.append(
        Fault("/entry/10028", "status", status=429, times=1, retry_after_s=0.4)
    )
    http = client(archive_server, max_backoff_s=5.0)
    started = time.perf_counter()
    assert "EMPIAR-10028" in http.get_json("entry/10028")
    assert time.perf_counter() - started >= 0.4
    assert http.requests_made == 2


def test_backoff_grows_exponentially(archive_server):
    archive_server.faults.append(Fault("/entry/10028", "status", status=502, times=3))
    http = client(archive_server, retries=3, backoff_s=0.1, max_backoff_s=10.0)
    started = time.perf_counter()
    http.get_json("entry/10028")
    # waits of 0.1, 0.2 and 0.4 s, each jittered down to no less than half
    assert time.perf_counter() - started >= (0.1 + 0.2 + 0.4) / 2
    assert [s for _, p, s in archive_server.requests] == [502, 502, 502, 200]


def test_polite_delay_spaces_requests(archive_server):
    http = client(archive_server, polite_delay_s=0.15)
    started = time.perf_counter()
    for _ in range(3):
        http.get_json("entry/10028")
    assert time.perf_counter() - started >= 0.3


def test_not_found_is_not_retried(archive_server):
    http = client(archive_server)
    with pytest.raises(NotFoundError) as error:
        http.get_json("entry/99999")
    assert error.value.status == 404 and error.value.url.endswith("/entry/99999")
    assert http.requests_made == 1


def test_final_failures_are_typed(archive_server):
    archive_server.faults.append(Fault("/entry/10005", "status", status=503, times=-1))
    archive_server.faults.append(
        Fault("/entry/10049", "status", status=429, times=-1, retry_after_s=0)
    )
    http = client(archive_server)
    with pytest.raises(ServerError, match=r"entry/10005.*503") as error:
        http.get_json("entry/10005")
    assert error.value.status == 503
    with pytest.raises(RateLimitedError, match="entry/10049"):
        http.get_json("entry/10049")
    assert http.requests_made == 6  # 1 + 2 retries each


def test_garbage_body_is_a_bad_payload(archive_server):
    archive_server.faults.append(Fault("/entry/10028", "garbage"))
    with pytest.raises(BadPayloadError, match="not JSON"):
        client(archive_server).get_json("entry/10028")


def test_timeout_is_retried_then_a_server_error(archive_server):
    archive_server.faults.append(Fault("/entry/10028", "slow", delay_s=1.0, times=1))
    http = client(archive_server, timeout_s=0.3)
    assert "EMPIAR-10028" in http.get_json("entry/10028")  # the retry is fast
    archive_server.faults.append(Fault("/entry/10005", "slow", delay_s=1.0, times=-1))
    with pytest.raises(ServerError, match="timed out"):
        http.get_json("entry/10005")


def test_connection_refused_is_a_server_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = HttpClient(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01)
    with pytest.raises(ServerError, match="connection failed"):
        http.get_json("entry/1")
    assert http.requests_made == 2

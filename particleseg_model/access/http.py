"""A polite HTTP client for the EMPIAR, EMDB and archive endpoints.

Retries (``PARTICLESEG_HTTP_RETRIES``, default 5) with exponential backoff and jitter on 429,
5xx, connection errors and timeouts, honours ``Retry-After`` (seconds), waits ``polite_delay_s``
between requests, and turns the final failure into a typed error naming the URL:
:class:`NotFoundError` (404, never retried),
:class:`RateLimitedError` (429), :class:`ServerError` (5xx, connection failures, timeouts) and
:class:`BadPayloadError` (a reply that is not the JSON we asked for).
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from typing import Any

import requests

__all__ = [
    "BadPayloadError",
    "HttpClient",
    "HttpError",
    "NotFoundError",
    "RateLimitedError",
    "ServerError",
]

log = logging.getLogger("particleseg.http")

USER_AGENT = "particleseg/0.1 (+https://github.com/particleseg)"


class HttpError(Exception):
    """A request that failed for good; ``url`` and ``status`` (None without a reply) say which."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None):
        super().__init__(message)
        self.url = url
        self.status = status


class NotFoundError(HttpError):
    """404: the entry, map or file does not exist."""


class RateLimitedError(HttpError):
    """429 after every retry."""


class ServerError(HttpError):
    """5xx, a connection failure or a timeout after every retry."""


class BadPayloadError(HttpError):
    """A reply whose body is not what the API documents (invalid JSON, wrong shape)."""


def connection_reason(exc: BaseException) -> str:
    """What went wrong with a connection, in the words of the socket: "Connection refused",
    "Name or service not known", "Remote end closed connection without response", rather
    than requests' nested reprs."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.search(
        r"(?:RemoteDisconnected|ProtocolError|ConnectionResetError)\('([^']+)'", text
    )
    return found.group(1).strip() if found else (text or type(exc).__name__)


def _retry_after_s(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class HttpClient:
    """Requests against one base URL, with retries, backoff and typed errors."""

    def __init__(
        self,
        base_url: str,
        *,
        retries: int | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 30.0,
        polite_delay_s: float = 0.0,
        session: requests.Session | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        # a site behind a flaky proxy, or a test, tunes this without code
        self.retries = (
            int(os.environ.get("PARTICLESEG_HTTP_RETRIES", 5)) if retries is None else retries
        )
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.polite_delay_s = polite_delay_s
        self.session = session or requests.Session()
        self.session.headers.setdefault("User-Agent", USER_AGENT)
        self.requests_made = 0
        self._lock = threading.Lock()
        self._last_request = 0.0

    def url(self, path: str) -> str:
        """``path`` under the base URL; an absolute ``http(s)://`` URL is returned unchanged."""
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url

    def _wait_politely(self) -> None:
        if self.polite_delay_s <= 0:
            return
        with self._lock:
            wait = self._last_request + self.polite_delay_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last_request = time.monotonic()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return delay * (0.5 + random.random() / 2)  # jitter so clients do not retry in lockstep

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        data: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        """One request with retries; returns a 2xx, 3xx or 416 response, raises HttpError else."""
        url = self.url(path)
        last: HttpError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self._backoff(attempt - 1, getattr(last, "retry_after", None))
                log.warning("%s; retry %d/%d in %.2f s", last, attempt, self.retries, delay)
                time.sleep(delay)
            self._wait_politely()
            self.requests_made += 1
            try:
                response = self.session.request(
                    method,
                    url,
                    headers=headers,
                    params=params,
                    data=data,
                    stream=stream,
                    timeout=self.timeout_s,
                )
            except requests.Timeout as exc:
                last = ServerError(f"{method} {url}: timed out after {self.timeout_s:g} s", url=url)
                last.__cause__ = exc
                continue
            except requests.ConnectionError as exc:
                last = ServerError(
                    f"{method} {url}: connection failed ({connection_reason(exc)})", url=url
                )
                last.__cause__ = exc
                continue
            status = response.status_code
            if status < 400 or status == 416:
                return response
            response.close()
            if status == 404:
                raise NotFoundError(f"{method} {url}: not found (404)", url=url, status=404)
            if status == 429:
                last = RateLimitedError(f"{method} {url}: rate limited (429)", url=url, status=429)
                last.retry_after = _retry_after_s(response)  # type: ignore[attr-defined]
                continue
            if status >= 500:
                last = ServerError(
                    f"{method} {url}: server error ({status})", url=url, status=status
                )
                last.retry_after = _retry_after_s(response)  # type: ignore[attr-defined]
                continue
            raise HttpError(f"{method} {url}: HTTP {status}", url=url, status=status)
        assert last is not None
        raise last

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            snippet = response.text[:80].replace("\n", " ")
            raise BadPayloadError(
                f"{method} {response.url}: reply is not JSON ({snippet!r})",
                url=response.url,
                status=response.status_code,
            ) from exc

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._json("GET", path, params=params, headers={"Accept": "application/json"})

    def post_json(self, path: str, data: Any = None) -> Any:
        return self._json("POST", path, data=data, headers={"Accept": "application/json"})

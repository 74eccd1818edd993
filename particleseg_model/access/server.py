"""A local EMPIAR-compatible server: the EMPIAR API, the EMDB API and the file archive.

Serves a :class:`~particleseg_model.access.mirror.Mirror` directory on loopback with the URL layout
of the public services, so that clients point at it by base URL alone::

    GET|POST /empiar/api/entry/<id>[,<id>|<from>-<to>...]   entries ({"EMPIAR-x": record, ...})
    GET      /emdb/api/empiar/search/<solr query>?rows=&page=  EMPIAR search, paged
    GET      /emdb/api/entry/EMD-xxxx                          EMDB entry
    GET|HEAD /empiar/world_availability/<id>/...               files (Range) and Apache listings
    GET|HEAD /pub/databases/emdb/structures/EMD-<n>/...        EMDB's map files, the same way

Unknown things answer ``404 {"detail": "Not found."}`` as the EMPIAR API does. Tests inject
:class:`Fault` s (an error status, a slow reply, a connection cut mid-body, a garbage body) by
appending to ``server.faults``; every request is recorded in ``server.requests``.
"""

from __future__ import annotations

import email.utils
import html
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from particleseg_model.access.mirror import Mirror

__all__ = ["ArchiveServer", "Fault", "serve"]

log = logging.getLogger("particleseg.server")

EMPIAR_PREFIX = "/empiar/api"
EMDB_PREFIX = "/emdb/api"
ARCHIVE_PREFIX = "/empiar/world_availability"
# EMDB's file tree, at the path EBI serves it under (ftp.ebi.ac.uk/pub/databases/emdb)
EMDB_FILES_PREFIX = "/pub/databases/emdb"
CHUNK_BYTES = 1 << 16


@dataclass
class Fault:
    """A failure injected into the replies whose path matches ``path_pattern`` (a regex).

    ``kind``: ``"status"`` (reply ``status``, with ``Retry-After: retry_after_s`` if given),
    ``"slow"`` (wait ``delay_s`` then reply normally; an archive file's body trickles at
    ``bytes_per_s`` when that is set, to catch a download in flight), ``"cut"`` (close the
    connection after ``cut_after_bytes`` bytes of the body), ``"garbage"`` (200 with a body
    that is not JSON).
    ``times`` is how many replies it spoils; -1 means every one.
    """

    path_pattern: str
    kind: str = "status"
    status: int = 500
    delay_s: float = 0.0
    cut_after_bytes: int = 0
    times: int = 1
    retry_after_s: float | None = None
    bytes_per_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("status", "slow", "cut", "garbage"):
            raise ValueError(f"unknown fault kind {self.kind!r}")


def _apache_size(size: int) -> str:
    """Sizes as Apache's autoindex prints them (``FancyIndexing``): 512, 4.0K, 254M, 1.2G."""
    if size < 1024:
        return str(size)
    for unit in "KMGT":
        size_f = size / 1024
        if size_f < 1024 or unit == "T":
            return f"{size_f:.1f}{unit}" if size_f < 10 else f"{size_f:.0f}{unit}"
        size = int(size_f)
    return str(size)


def autoindex_html(url_path: str, directory: Path) -> str:
    """An Apache 2.4 ``mod_autoindex`` page for ``directory``, served at ``url_path``."""
    title = f"Index of {html.escape(url_path.rstrip('/') or '/')}"
    lines = [
        '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">',
        f"<html>\n <head>\n  <title>{title}</title>\n </head>\n <body>\n<h1>{title}</h1>",
        '<pre><img src="/icons/blank.gif" alt="Icon "> <a href="?C=N;O=D">Name</a>'
        '                    <a href="?C=M;O=A">Last modified</a>      <a href="?C=S;O=A">'
        'Size</a>  <a href="?C=D;O=A">Description</a><hr>'
        '<img src="/icons/back.gif" alt="[PARENTDIR]"> <a href="'
        f'{html.escape(url_path.rstrip("/").rsplit("/", 1)[0] + "/")}">Parent Directory</a>'
        "                             -   ",
    ]
    for child in sorted(directory.iterdir(), key=lambda p: p.name):
        if child.name.startswith(".") or child.name.endswith(".part"):
            continue
        stat = child.stat()
        modified = time.strftime("%Y-%m-%d %H:%M", time.gmtime(stat.st_mtime))
        name = child.name + ("/" if child.is_dir() else "")
        size = "-" if child.is_dir() else _apache_size(stat.st_size)
        icon = (
            '<img src="/icons/folder.gif" alt="[DIR]">'
            if child.is_dir()
            else '<img src="/icons/unknown.gif" alt="[   ]">'
        )
        # Apache truncates long names in the text but never in the link
        shown = html.escape(name) if len(name) <= 23 else html.escape(name[:20]) + "..&gt;"
        lines.append(
            f'{icon} <a href="{quote(name)}">{shown}</a>'
            f"{' ' * max(1, 24 - len(name))}{modified}  {size:>4}  "
        )
    lines.append("<hr></pre>\n</body></html>\n")
    return "\n".join(lines)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body leave in one segment: without these, Nagle plus delayed ACKs add
    # 40 ms to every keep-alive reply
    disable_nagle_algorithm = True
    wbufsize = 1 << 16
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing --------------------------------------------------------------------------
    def _path(self) -> str:
        return unquote(urlsplit(self.path).path)

    def _record(self, status: int) -> None:
        self.server.owner.requests.append((self.command, self._path(), status))

    def _take_fault(self) -> Fault | None:
        path = self._path()
        with self.server.owner.lock:
            for fault in self.server.owner.faults:
                if fault.kind == "cut" and self.command == "HEAD":
                    continue  # no body to cut: leave the fault for the GET that follows
                if fault.times != 0 and re.search(fault.path_pattern, path):
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        cut_after: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self._record(status)
        if self.command == "HEAD":
            return
        if cut_after is not None:
            self.wfile.write(body[:cut_after])
            self._cut()
            return
        self.wfile.write(body)

    def _cut(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        try:
            import socket

            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _json(self, status: int, payload: Any, fault: Fault | None = None) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        self._send_body(status, body, fault)

    def _send_body(
        self, status: int, body: bytes, fault: Fault | None, content_type: str = "application/json"
    ) -> None:
        cut = fault.cut_after_bytes if fault is not None and fault.kind == "cut" else None
        self._send(status, body, content_type, cut_after=cut)

    def _not_found(self) -> None:
        self._send(404, b'{"detail": "Not found."}')

    # -- dispatch --------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch()

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._dispatch()

    def _dispatch(self) -> None:
        try:
            fault = self._take_fault()
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay_s)
            elif fault is not None and fault.kind == "status":
                headers = {}
                if fault.retry_after_s is not None:
                    headers["Retry-After"] = f"{fault.retry_after_s:g}"
                body = json.dumps({"detail": f"injected fault {fault.status}"}).encode()
                self._send(fault.status, body, headers=headers)
                return
            elif fault is not None and fault.kind == "garbage":
                self._send(200, b"<html><body>Service temporarily unavailable", "application/json")
                return
            self._route(fault)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a server bug must show as a 500, not a hung client
            log.exception("error serving %s", self.path)
            try:
                self._json(500, {"detail": f"server error: {exc}"})
            except OSError:
                self.close_connection = True

    def _route(self, fault: Fault | None) -> None:
        path = self._path()
        mirror = self.server.owner.mirror
        if path.startswith(EMPIAR_PREFIX + "/entry/"):
            spec = path[len(EMPIAR_PREFIX + "/entry/") :].strip("/")
            if self.command == "GET" and re.fullmatch(r"(?i)(EMPIAR-)?\d+", spec):
                try:
                    self._send_body(200, mirror.entry_bytes(spec), fault)
                except KeyError:
                    self._not_found()
                return
            try:
                found = mirror.entries(spec)
            except ValueError as exc:
                self._json(400, {"detail": str(exc)})
                return
            if not found:
                self._not_found()
                return
            self._json(200, found, fault)
        elif path.startswith(EMDB_PREFIX + "/empiar/search/"):
            query = path[len(EMDB_PREFIX + "/empiar/search/") :]
            params = parse_qs(urlsplit(self.path).query)
            try:
                rows = int(params.get("rows", ["100"])[0])
                page = int(params.get("page", ["1"])[0])
                reply = mirror.search(query, rows=rows, page=page)
            except ValueError as exc:
                self._json(400, {"detail": str(exc)})
                return
            self._json(200, reply, fault)
        elif path.startswith(EMDB_PREFIX + "/entry/"):
            key = path[len(EMDB_PREFIX + "/entry/") :].strip("/")
            try:
                self._send_body(200, mirror.emdb_path(key).read_bytes(), fault)
            except (KeyError, FileNotFoundError):
                self._not_found()
        elif path == ARCHIVE_PREFIX or path.startswith(ARCHIVE_PREFIX + "/"):
            self._archive(path[len(ARCHIVE_PREFIX) :], fault)
        elif path == EMDB_FILES_PREFIX or path.startswith(EMDB_FILES_PREFIX + "/"):
            try:
                target = mirror.emdb_files_path(path[len(EMDB_FILES_PREFIX) :])
            except KeyError:
                self._not_found()
                return
            self._tree(target, fault)
        else:
            self._not_found()

    # -- archive files -----------------------------------------------------------------------
    def _archive(self, relative: str, fault: Fault | None) -> None:
        try:
            target = self.server.owner.mirror.archive_path(relative)
        except KeyError:
            self._not_found()
            return
        self._tree(target, fault)

    def _tree(self, target: Path, fault: Fault | None) -> None:
        """A file (Range, HEAD) or an Apache listing of a folder of the mirror."""
        if target.is_dir():
            if not self._path().endswith("/"):
                location = quote(self._path() + "/")
                self._send(301, b"", "text/html", headers={"Location": location})
                return
            page = autoindex_html(self._path(), target).encode()
            self._send_body(200, page, fault, "text/html;charset=UTF-8")
            return
        if not target.is_file() or target.name.endswith(".part"):
            self._not_found()
            return
        self._file(target, fault)

    def _file(self, target: Path, fault: Fault | None) -> None:
        size = target.stat().st_size
        start, end, status = 0, size - 1, 200
        headers = {
            "Accept-Ranges": "bytes",
            "Last-Modified": email.utils.formatdate(target.stat().st_mtime, usegmt=True),
        }
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = int(match.group(2)) if match.group(2) else size - 1
                else:  # suffix range: the last N bytes
                    start = max(0, size - int(match.group(2)))
                end = min(end, size - 1)
                if start >= size or start > end:
                    headers["Content-Range"] = f"bytes */{size}"
                    self._send(416, b"", "text/plain", headers=headers)
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self._record(status)
        if self.command == "HEAD":
            return
        limit = fault.cut_after_bytes if fault is not None and fault.kind == "cut" else None
        rate = fault.bytes_per_s if fault is not None and fault.kind == "slow" else 0.0
        sent = 0
        with open(target, "rb") as handle:
            handle.seek(start)
            while sent < length:
                n = min(CHUNK_BYTES, length - sent)
                if limit is not None:
                    n = min(n, limit - sent)
                    if n <= 0:
                        self._cut()
                        return
                chunk = handle.read(n)
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
                if rate > 0:
                    self.wfile.flush()
                    time.sleep(len(chunk) / rate)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: ArchiveServer


class ArchiveServer:
    """A running server; use as a context manager or call :meth:`stop`."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.mirror = Mirror(root)
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self.host, self.port = self._httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}"

    @property
    def empiar_url(self) -> str:
        return self.url + EMPIAR_PREFIX

    @property
    def emdb_url(self) -> str:
        return self.url + EMDB_PREFIX

    @property
    def archive_url(self) -> str:
        return self.url + ARCHIVE_PREFIX

    @property
    def emdb_files_url(self) -> str:
        return self.url + EMDB_FILES_PREFIX

    def env(self) -> dict[str, str]:
        """The environment that points every particleSeg client at this server."""
        return {
            "PARTICLESEG_EMPIAR_URL": self.empiar_url,
            "PARTICLESEG_EMDB_URL": self.emdb_url,
            "PARTICLESEG_ARCHIVE_URL": self.archive_url,
            "PARTICLESEG_EMDB_FILES_URL": self.emdb_files_url,
        }

    def start(self) -> ArchiveServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"archive-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> ArchiveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    root: str | Path, host: str = "127.0.0.1", port: int = 0, *, background: bool = True
) -> ArchiveServer:
    """Serve ``root`` on ``host:port`` (0 = a free port); in a daemon thread by default."""
    server = ArchiveServer(root, host, port)
    if background:
        return server.start()
    try:
        server.serve_forever()
    finally:
        server.stop()
    return server

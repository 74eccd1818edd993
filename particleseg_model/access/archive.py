"""Listing and downloading files of the EMPIAR archive (or any Apache-style file server).

The public archive is ``https://ftp.ebi.ac.uk/empiar/world_availability/<id>/...``: Apache
``mod_autoindex`` directory pages, sizes from ``HEAD`` (``Content-Length``), byte ranges.

* :func:`list_directory` parses an autoindex page (both the ``<pre>`` and the ``<table>``
  layouts) into :class:`RemoteFile` s; a ``file://`` URL or a plain path lists a local folder.
  Sizes from a web page are Apache's rounded ones (``1.2K``, ``254M``): approximate; a local
  listing has exact sizes.
* :func:`download` streams into ``<dest>.part``, resumes a ``.part`` with ``Range`` (one left
  by an earlier run only once its last :data:`VERIFY_BYTES` match the remote file's: a stale
  or foreign ``.part`` is thrown away, never completed into a corrupt file), survives
  connection cuts (it resumes from what it has), checks the final size against what the server
  said (``Content-Length``/``Content-Range``/``HEAD``) and ``expected_size``, and only then
  renames the ``.part`` to ``dest``: ``dest`` is either absent, the previous file, or complete.
  A ``dest`` that already has the remote size is left alone (one ``HEAD``, no ``GET``; no
  request at all when it has ``expected_size``).
* :func:`download_tree` does both, recursively, with ``include`` patterns.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

import requests
import urllib3

from particleseg_model.access.http import HttpClient, HttpError, NotFoundError
from particleseg_model.atomic import fsync_dir
from particleseg_model.progress import Bar
from particleseg_model.progress import progress as progress_bar
from particleseg_model.storage import is_remote, local_path

__all__ = [
    "DownloadError",
    "RemoteFile",
    "download",
    "download_tree",
    "list_directory",
    "parse_size",
]

log = logging.getLogger("particleseg.archive")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGTP]?)(?:i?B)?", re.IGNORECASE)
_ROW_END = "\x00"  # marks the end of a listing row in the text the parser collects
VERIFY_BYTES = 64 << 10
"""A ``.part`` left by an earlier run is resumed only when its last bytes (this many, or all of
a smaller one) are the remote file's: the resumed GET starts that far back and compares."""
# a mid-body failure: requests wraps some, raw urllib3 streams raise the others
_STREAM_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


class DownloadError(Exception):
    """A download that failed for good; the message names the URL and the destination file."""

    def __init__(
        self, message: str, *, url: str = "", dest: Path | None = None, status: int | None = None
    ):
        super().__init__(message)
        self.url = url
        self.dest = dest
        self.status = status


@dataclass(frozen=True)
class RemoteFile:
    """One entry of a directory listing (``url`` of a directory ends with ``/``)."""

    name: str
    url: str
    is_dir: bool
    size_bytes: int | None


def parse_size(text: str) -> int | None:
    """Apache's size column in bytes: ``"512"`` -> 512, ``"1.2K"`` -> 1229, ``"-"`` -> None."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        return None
    return round(float(match.group(1)) * _UNITS[match.group(2).upper()])


# -- local paths ------------------------------------------------------------------------------
def _local_path(url: str | os.PathLike[str]) -> Path | None:
    """The local path of a ``file://`` URL or a plain path; None for anything with a scheme."""
    return None if is_remote(url) else local_path(url)


def _list_local(folder: Path) -> list[RemoteFile]:
    if not folder.is_dir():
        raise (NotADirectoryError if folder.exists() else FileNotFoundError)(
            f"not a directory: {folder}"
        )
    entries = []
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
        # as the server does: no hidden files, no unfinished downloads
        if child.name.startswith(".") or child.name.endswith(".part"):
            continue
        is_dir = child.is_dir()
        uri = child.absolute().as_uri() + ("/" if is_dir else "")
        entries.append(
            RemoteFile(child.name, uri, is_dir, None if is_dir else child.stat().st_size)
        )
    return entries


# -- Apache autoindex pages -------------------------------------------------------------------
class _LinkParser(HTMLParser):
    """Collects ``[href, text after the link up to the next link or row end]``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[list[str]] = []
        self._in_link = False

    def _tail(self, text: str) -> None:
        if self.links and not self._in_link:
            self.links[-1][1] += text

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href is not None:
                self.links.append([href, ""])
                self._in_link = True
        elif tag in ("td", "th"):
            self._tail(" ")
        elif tag in ("tr", "li", "br", "hr", "p", "div", "table"):
            self._tail(_ROW_END)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._in_link = False
        elif tag in ("tr", "li", "pre", "table", "ul"):
            self._tail(_ROW_END)

    def handle_data(self, data: str) -> None:
        self._tail(data)


def _row_size(row_text: str) -> int | None:
    """The first size-like token of a row's text (date and time tokens never match)."""
    for token in row_text.split(_ROW_END, 1)[0].split():
        if token == "-":
            return None
        size = parse_size(token)
        if size is not None:
            return size
    return None


def parse_listing(page: str, base_url: str) -> list[RemoteFile]:
    """The children of the directory at ``base_url`` that an autoindex ``page`` links to.

    Sort links (``?C=N;O=D``), the parent directory, icons and anything not directly below
    ``base_url`` are skipped; a name linked twice (icon and text) is listed once.
    """
    if not base_url.endswith("/"):
        base_url += "/"
    base = urlsplit(base_url)
    base_path = unquote(base.path)
    parser = _LinkParser()
    parser.feed(page)
    parser.close()
    found: dict[str, RemoteFile] = {}
    for href, tail in parser.links:
        if not href or href.startswith(("?", "#")):
            continue
        target = urlsplit(urljoin(base_url, href))
        if target.query or (target.scheme, target.netloc.lower()) != (
            base.scheme,
            base.netloc.lower(),
        ):
            continue
        path = unquote(target.path)
        if not path.startswith(base_path):
            continue
        rest = path[len(base_path) :]
        name = rest.rstrip("/")
        if not name or "/" in name or name in (".", ".."):
            continue
        is_dir = rest.endswith("/")
        url = urlunsplit(
            (base.scheme, base.netloc, base.path + quote(name) + ("/" if is_dir else ""), "", "")
        )
        size = None if is_dir else _row_size(tail)
        previous = found.get(url)
        if previous is None or (previous.size_bytes is None and size is not None):
            found[url] = RemoteFile(name, url, is_dir, size)
    return list(found.values())


def list_directory(url: str | os.PathLike[str], http: HttpClient | None = None) -> list[RemoteFile]:
    """The files and folders of an archive directory (an Apache listing or a local folder).

    Raises :class:`~particleseg_model.access.http.NotFoundError` for a missing remote directory,
    ``FileNotFoundError``/``NotADirectoryError`` for a local one, ``ValueError`` when the
    reply is not an HTML listing.
    """
    local = _local_path(url)
    if local is not None:
        return _list_local(local)
    url = str(url)
    if not url.endswith("/"):
        url += "/"  # the directory itself, not a redirect to it
    client = http or HttpClient(url)
    response = client.request("GET", url, headers={"Accept": "text/html"})
    with response:
        content_type = response.headers.get("Content-Type", "text/html")
        if "html" not in content_type.lower():
            raise ValueError(f"{url}: not a directory listing (Content-Type {content_type})")
        page = response.text
        final_url = response.url or url
    return parse_listing(page, final_url)


# -- downloads --------------------------------------------------------------------------------
def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(start, total)`` of ``bytes 0-99/1000`` or ``bytes */1000`` (None where absent)."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _int_header(response: requests.Response, name: str) -> int | None:
    try:
        return int(response.headers[name])
    except (KeyError, ValueError):
        return None


def _remote_size(client: HttpClient, url: str) -> int | None:
    """``Content-Length`` of a ``HEAD``; None when the server does not say or refuses HEAD.

    A 404, a server that keeps failing or cannot be reached raises (the GET would too).
    """
    try:
        response = client.request("HEAD", url, headers={"Accept-Encoding": "identity"})
    except HttpError as exc:
        refused = exc.status is not None and (400 <= exc.status < 500 or exc.status == 501)
        if isinstance(exc, NotFoundError) or not refused:
            raise
        log.info("HEAD %s refused (%s); the size comes from the GET", url, exc)
        return None
    with response:
        if response.headers.get("Content-Encoding", "identity") != "identity":
            return None
        return _int_header(response, "Content-Length")


def _bar(show: bool, **kwargs: Any) -> Any:
    """A progress bar; ``show=False`` is off even when ``PARTICLESEG_PROGRESS=1``."""
    return progress_bar(**kwargs) if show else Bar(disable=True, **kwargs)


def _sleep_backoff(client: Any, attempt: int) -> None:
    backoff = float(getattr(client, "backoff_s", 0.5))
    cap = float(getattr(client, "max_backoff_s", 30.0))
    delay = min(cap, backoff * 2**attempt)
    time.sleep(delay * (0.5 + random.random() / 2))


def _finish(part: Path, dest: Path) -> Path:
    # not atomic.atomic_path: the ``.part`` name is the resume protocol, kept across runs; the
    # publication follows the same policy (fsync the data, rename, fsync the folder)
    with open(part, "ab") as handle:  # "a": an empty file may have no .part yet
        os.fsync(handle.fileno())
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _resolve_dest(url: str, dest: str | os.PathLike[str]) -> Path:
    """``dest`` itself, or ``dest/<name of url>`` when ``dest`` is a folder (or ends in /)."""
    path = Path(dest)
    if path.is_dir() or str(dest).endswith(("/", os.sep)):
        name = (
            unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
            if "://" in url
            else Path(url).name
        )
        if not name:
            raise ValueError(f"cannot name a file after {url}; give the destination file")
        path = path / name
    return path


def _copy_local(
    source: Path, dest: Path, expected_size: int | None, show: bool, chunk_bytes: int, url: str
) -> Path:
    part = dest.with_name(dest.name + ".part")
    try:
        size = source.stat().st_size
    except OSError as exc:
        raise DownloadError(
            f"download of {url} to {dest} failed: {exc}", url=url, dest=dest
        ) from exc
    if expected_size is not None and size != expected_size:
        raise DownloadError(
            f"download of {url} to {dest} failed: the source has {size} bytes, "
            f"expected {expected_size}",
            url=url,
            dest=dest,
        )
    if _size(dest) == size:
        log.info("%s is complete (%d bytes); not copied again", dest, size)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    bar = _bar(
        show, total=size, desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024, leave=False
    )
    try:
        with open(source, "rb") as src, open(part, "wb") as out:
            while chunk := src.read(chunk_bytes):
                out.write(chunk)
                bar.update(len(chunk))
        copied = part.stat().st_size
        if copied != size:
            raise DownloadError(
                f"download of {url} to {dest} failed: copied {copied} of {size} bytes",
                url=url,
                dest=dest,
            )
        shutil.copystat(source, part)
        return _finish(part, dest)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise DownloadError(
            f"download of {url} to {dest} failed: {exc}", url=url, dest=dest
        ) from exc
    finally:
        bar.close()


def download(  # noqa: C901 - to split (pyproject: mccabe)
    url: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    http: HttpClient | None = None,
    expected_size: int | None = None,
    progress: bool = True,
    chunk_bytes: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest`` (a file, or a folder to put it in); returns the file.

    Resumable and atomic: data goes to ``<dest>.part`` (resumed with ``Range`` when it exists)
    (a ``.part`` of an earlier run only when its last :data:`VERIFY_BYTES` are the remote
    file's, else it is started over) and becomes ``dest`` only once its size matches what the
    server announced and
    ``expected_size``. A connection cut mid-body is resumed from the ``.part``; after
    ``http.retries`` attempts in a row that bring no new byte, :class:`DownloadError` is raised
    and the ``.part`` stays for the next call to resume. A ``dest`` that already has the remote
    size (``HEAD``) or ``expected_size`` is returned as is. ``file://`` URLs and local paths
    are copied (temp file + rename).
    ``progress``: a byte bar (shown on a terminal, see :mod:`particleseg_model.progress`).
    """
    source = _local_path(url)
    url = str(url)
    dest = _resolve_dest(url, dest)
    if source is not None:
        return _copy_local(source, dest, expected_size, progress, chunk_bytes, url)

    if urlsplit(url).path.endswith("/"):
        raise ValueError(f"{url} is a directory: use download_tree")
    client = http or HttpClient(url)
    part = dest.with_name(dest.name + ".part")

    def fail(reason: str, status: int | None = None) -> DownloadError:
        kept = _size(part)
        if kept == 0:
            part.unlink()
            kept = None
        note = f" ({kept} bytes kept in {part.name}; run again to resume)" if kept else ""
        return DownloadError(
            f"download of {url} to {dest} failed: {reason}{note}", url=url, dest=dest, status=status
        )

    # the size comes with the GET (Content-Length, Content-Range); a HEAD only to learn whether
    # an existing dest is complete
    total = expected_size
    existing = _size(dest)
    if existing is not None:
        if expected_size is None or existing != expected_size:
            try:
                remote = _remote_size(client, url)
            except HttpError as exc:
                raise fail(str(exc), exc.status) from exc
            if remote is not None and expected_size is not None and remote != expected_size:
                raise fail(f"the server has {remote} bytes, expected {expected_size}")
            total = remote if remote is not None else expected_size
        if total is not None and existing == total:
            log.info("%s is complete (%d bytes); not downloaded again", dest, total)
            part.unlink(missing_ok=True)  # a stale partial of the same file
            return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    retries = int(getattr(client, "retries", 5))
    bar = _bar(
        progress,
        total=total,
        desc=dest.name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        initial=_size(part) or 0,
        leave=False,
    )
    failures = 0  # attempts in a row that brought no new byte
    last_error = ""
    # a .part found on disk (not one this call wrote) is checked against the remote file
    # before it is resumed: the GET starts VERIFY_BYTES before its end
    unverified = bool(_size(part))
    try:
        while True:
            if failures > retries:
                raise fail(f"{last_error}; gave up after {failures} attempts")
            if failures:
                _sleep_backoff(client, failures - 1)
            offset = _size(part) or 0
            if total is not None and offset == total:
                return _finish(part, dest)  # a complete partial: nothing left to fetch
            if total is not None and offset > total:
                log.warning(
                    "%s is longer than the remote file (%d > %d bytes); starting over",
                    part,
                    offset,
                    total,
                )
                part.unlink()
                offset = 0
            bar.reset(total=total)
            bar.update(offset)
            headers = {"Accept-Encoding": "identity"}
            overlap = min(offset, VERIFY_BYTES) if unverified else 0
            if offset:
                headers["Range"] = f"bytes={offset - overlap}-"
            try:
                response = client.request("GET", url, headers=headers, stream=True)
            except HttpError as exc:
                raise fail(str(exc), exc.status) from exc
            with response:
                status = response.status_code
                if status == 416:
                    _, size = _content_range(response.headers.get("Content-Range"))
                    size = size if size is not None else total
                    if size is not None and offset == size:
                        return _finish(part, dest)
                    log.warning(
                        "%s: range %d- refused (416, remote size %s); starting over",
                        url,
                        offset,
                        size,
                    )
                    part.unlink(missing_ok=True)
                    failures += 1
                    last_error = f"range request refused (416) with {offset} bytes kept"
                    continue
                if status == 206:
                    start, size = _content_range(response.headers.get("Content-Range"))
                    if start != offset - overlap:
                        raise fail(
                            f"asked for bytes from {offset - overlap}, the server sent from "
                            f"{start}",
                            status,
                        )
                    if overlap:
                        try:
                            same = _same_tail(response, part, overlap)
                        except _STREAM_ERRORS as exc:
                            failures += 1
                            last_error = f"connection cut while checking {part.name} ({exc})"
                            continue
                        if not same:
                            log.warning(
                                "%s does not match the remote file in its last %d bytes: not "
                                "a partial download of %s; starting over",
                                part,
                                overlap,
                                url,
                            )
                            part.unlink()
                            unverified = False
                            continue
                    unverified = False
                    mode = "ab"
                elif status == 200:
                    if offset:
                        log.warning("%s ignored the Range request; downloading from zero", url)
                        offset = 0
                        bar.reset(total=total)
                    encoded = response.headers.get("Content-Encoding", "identity") != "identity"
                    size = None if encoded else _int_header(response, "Content-Length")
                    mode = "wb"
                else:
                    raise fail(f"unexpected reply HTTP {status}", status)
                if size is not None and expected_size is not None and size != expected_size:
                    raise fail(f"the server sends {size} bytes, expected {expected_size}")
                if size is not None and total is not None and size != total and offset:
                    # the remote file changed under us: the bytes we kept are of the old one
                    log.warning("%s changed size (%d -> %d bytes); starting over", url, total, size)
                    part.unlink(missing_ok=True)
                    failures += 1
                    last_error = f"the remote file changed size ({total} -> {size} bytes)"
                    total = size
                    continue
                if size is not None:
                    total = size
                    bar.total = total
                try:
                    received, cut = _stream_into(response, part, mode, chunk_bytes, bar)
                except OSError as exc:  # the disk, not the network
                    raise fail(f"cannot write {part}: {exc}") from exc
                if cut is not None:
                    failures = 0 if received else failures + 1
                    last_error = (
                        f"connection cut at byte {offset + received} ({type(cut).__name__})"
                    )
                    log.warning(
                        "%s: connection cut after %d bytes of this reply (%s); "
                        "resuming from byte %d",
                        url,
                        received,
                        cut,
                        offset + received,
                    )
                    continue
            have = _size(part) or 0
            if total is None or have == total:
                if expected_size is not None and have != expected_size:
                    part.unlink()
                    raise fail(f"received {have} bytes, expected {expected_size}")
                return _finish(part, dest)
            if have > total:
                part.unlink()
                failures += 1
                last_error = f"received {have} bytes, the server announced {total}"
                continue
            # a body that ended early without an error: resume like a cut
            failures = 0 if received else failures + 1
            last_error = f"body ended at {have} of {total} bytes"
            log.warning("%s: %s; resuming", url, last_error)
    finally:
        bar.close()


def _same_tail(response: requests.Response, part: Path, overlap: int) -> bool:
    """Whether the first ``overlap`` bytes of the reply are the last ``overlap`` of ``part``
    (the reply asked for them again, to tell a real partial download from a stale or foreign
    file); the reply's remaining bytes are left for :func:`_stream_into`."""
    received = b""
    while len(received) < overlap:
        chunk = response.raw.read(overlap - len(received), decode_content=False)
        if not chunk:
            break
        received += chunk
    with open(part, "rb") as handle:
        handle.seek(-overlap, os.SEEK_END)
        kept = handle.read(overlap)
    return received == kept


def _stream_into(
    response: requests.Response, part: Path, mode: str, chunk_bytes: int, bar: Any
) -> tuple[int, BaseException | None]:
    """Append (``"ab"``) or write (``"wb"``) the body to ``part``: ``(bytes, network error)``.

    A network failure mid-body is returned (the caller resumes); a disk failure raises.
    """
    received = 0
    stream = response.raw.stream(chunk_bytes, decode_content=False)
    with open(part, mode) as out:
        while True:
            try:
                chunk = next(stream, None)
            except _STREAM_ERRORS as exc:
                return received, exc
            if chunk is None:
                return received, None
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))


def _walk(
    url: str, client: HttpClient | None, prefix: str, seen: set[str]
) -> Iterable[tuple[str, RemoteFile]]:
    local = _local_path(url)
    key = str(local.resolve()) if local is not None else url
    if key in seen:  # a symlink loop in a local tree
        return
    seen.add(key)
    for entry in list_directory(url, client):
        relative = prefix + entry.name
        if entry.is_dir:
            yield from _walk(entry.url, client, relative + "/", seen)
        else:
            yield relative, entry


def download_tree(
    url: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    http: HttpClient | None = None,
    include: str | Iterable[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Download the directory ``url`` recursively into ``dest_dir``; returns the files.

    ``include``: fnmatch pattern(s) on the path relative to ``url`` (``"*.star"``,
    ``["data/*.mrcs", "*.star"]``; ``*`` also matches ``/``); None takes everything. Files
    already complete are not fetched again (see :func:`download`).
    """
    local = _local_path(url)
    if local is None:
        url = str(url) if str(url).endswith("/") else f"{url}/"
        client = http or HttpClient(url)
    else:
        url = local.absolute().as_uri() + "/"
        client = http
    patterns = (
        [include] if isinstance(include, str) else (list(include) if include is not None else None)
    )
    chosen = [
        (relative, entry)
        for relative, entry in _walk(url, client, "", set())
        if patterns is None or any(fnmatch.fnmatchcase(relative, p) for p in patterns)
    ]
    root = Path(dest_dir)
    paths = []
    bar = _bar(progress, total=len(chosen), desc=root.name or str(root), unit="file")
    try:
        for relative, entry in chosen:
            target = root.joinpath(*relative.split("/"))
            paths.append(download(entry.url, target, http=client, progress=progress))
            bar.update(1)
    finally:
        bar.close()
    return paths

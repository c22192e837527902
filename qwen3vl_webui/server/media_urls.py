"""Media in OpenAI messages -> files the chat path reads: base64 data URIs, and http(s) URLs only where allowed.

A decoded file is written under the upload folder (`openai/` below it, private), named by its content hash, so
the chat path checks it exactly as an upload (by content, under the pixel and frame budgets) and the upload
sweeper deletes it by age and size like any upload.

A URL is fetched only when `--allowed-media-domains` names its host, and then: http or https only, every address
the name resolves to must be a public one (never loopback, private, link-local or reserved: no reaching the
server's own network), a timeout, a size cap, and redirects only to the same host, each checked again. (A name
that resolves differently between the check and the connection could still reach a private address; list only
hosts you trust.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import socket
from pathlib import Path
from urllib.parse import urljoin, urlsplit

MIME_EXTENSIONS = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp", "image/gif": ".gif",
    "video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
}  # fmt: skip
FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3


class MediaRefused(ValueError):
    """A media part the API refuses; str() is the sentence for the client. `status`: the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def save_media(url: str, kind: str, folder: Path, max_bytes: int, allowed_domains: frozenset[str]) -> str:
    """The path of a file holding the media of `url` ("image" or "video" part; "document:<filename>" for a `file`
    part, a document read by service/longdoc.py)."""
    if kind.startswith("document:"):
        return _save_document(url, kind.partition(":")[2], folder, max_bytes)
    if url.startswith("data:"):
        mime, data = _decode_data_uri(url, kind, max_bytes)
    elif url.startswith(("http://", "https://")):
        host = urlsplit(url).hostname or ""
        if host.lower() not in allowed_domains:
            raise MediaRefused(
                f"{kind}_url: http(s) URLs are not fetched by this server (host {host!r} is not in "
                "--allowed-media-domains); send the file as a base64 data: URI instead."
            )
        mime, data = _fetch(url, kind, max_bytes, host.lower())
    else:
        raise MediaRefused(f"{kind}_url must be a data: URI (base64) or an allowed http(s) URL.")
    return _store(folder, data, MIME_EXTENSIONS[mime])


def _decode_data_uri(url: str, kind: str, max_bytes: int) -> tuple[str, bytes]:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise MediaRefused(f"{kind}_url: a data: URI must be base64 (data:<type>;base64,<data>).")
    mime = _mime(head[len("data:") : -len(";base64")], kind)
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaRefused(f"{kind}_url: the file is over the upload cap of {max_bytes // 2**20} MB.", 413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaRefused(f"{kind}_url: the data: URI is not valid base64.") from None
    if not data:
        raise MediaRefused(f"{kind}_url: the data: URI holds no data.")
    return mime, data


def _mime(mime: str, kind: str) -> str:
    mime = mime.split(";")[0].strip().lower()
    if mime not in MIME_EXTENSIONS or not mime.startswith(kind + "/"):
        accepted = ", ".join(m for m in MIME_EXTENSIONS if m.startswith(kind + "/"))
        raise MediaRefused(f"{kind}_url: type {mime or '(none)'!r} is not accepted; send one of {accepted}.")
    return mime


def _fetch(url: str, kind: str, max_bytes: int, host: str) -> tuple[str, bytes]:
    import httpx

    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or (parts.hostname or "").lower() != host:
            raise MediaRefused(f"{kind}_url: redirected to another host; not followed.")
        _check_public(host, parts.port or (443 if parts.scheme == "https" else 80))
        try:
            with httpx.stream("GET", url, timeout=FETCH_TIMEOUT_S, follow_redirects=False, trust_env=False) as reply:
                if reply.is_redirect:
                    url = urljoin(url, reply.headers.get("location", ""))
                    continue
                if reply.status_code != 200:
                    raise MediaRefused(f"{kind}_url: the server answered HTTP {reply.status_code}.")
                mime = _mime(reply.headers.get("content-type", ""), kind)
                data = bytearray()
                for chunk in reply.iter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise MediaRefused(f"{kind}_url: the file is over the upload cap of {max_bytes // 2**20} MB.", 413)
                return mime, bytes(data)
        except httpx.HTTPError as exc:
            raise MediaRefused(f"{kind}_url could not be fetched ({type(exc).__name__}).") from None
    raise MediaRefused(f"{kind}_url: too many redirects.")


def _check_public(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise MediaRefused(f"media URL host {host!r} could not be resolved.") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise MediaRefused(f"media URL host {host!r} resolves to a non-public address; not fetched.")


def _store(folder: Path, data: bytes, extension: str, stem: str | None = None) -> str:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / ((stem or hashlib.sha256(data).hexdigest()[:32]) + extension)
    if not path.exists():
        temp = path.with_name(path.name + f".{os.getpid()}.part")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    else:
        os.utime(path)  # young again: the sweeper keeps what is in use
    return str(path)


DOCUMENT_MIMES = {"application/pdf": ".pdf", "text/plain": ".txt", "text/markdown": ".md", "text/csv": ".csv",
                  "application/json": ".json"}  # fmt: skip


def _save_document(url: str, filename: str, folder: Path, max_bytes: int) -> str:
    """A `file` part's base64 `file_data` -> `<folder>/<content hash>/<its filename>` (the name the answer cites)."""
    import re

    from qwen3vl_webui.documents import DOCUMENT_EXTENSIONS

    if not url.startswith("data:"):
        raise MediaRefused("file: send file_data as a base64 data: URI (file_id and URLs are not supported).")
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise MediaRefused("file: file_data must be base64 (data:<type>;base64,<data>).")
    mime = head[len("data:") : -len(";base64")].split(";")[0].strip().lower()
    name = re.sub(r"[^A-Za-z0-9._ -]", "_", os.path.basename(filename or ""))[:80].strip(" .")
    suffix = os.path.splitext(name)[1].lower()
    extension = suffix if suffix in DOCUMENT_EXTENSIONS else DOCUMENT_MIMES.get(mime)
    if extension is None:
        raise MediaRefused(f"file: type {mime or '(none)'!r} is not accepted; send a .pdf, .txt, .md, .csv or .json.")
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaRefused(f"file: the file is over the upload cap of {max_bytes // 2**20} MB.", 413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaRefused("file: file_data is not valid base64.") from None
    if not data:
        raise MediaRefused("file: file_data holds no data.")
    stem = os.path.splitext(name)[0] or "document"
    return _store(folder / "documents" / hashlib.sha256(data).hexdigest()[:32], data, extension, stem)

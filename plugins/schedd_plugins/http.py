"""The ``http`` task: make one HTTP(S) request and judge it by its status.

Output is a log, and logs get shared: values of headers whose names look secret
(``Authorization``, ``Cookie``, ``*token*``, ``*key*``, ``*secret*`` ...), a password
in the URL and secret-looking query parameters are never printed. Credentials in
the URL (``https://user:pw@host/``) are sent as HTTP basic auth, since urllib would
otherwise take them for part of the host name.

``timeout`` bounds connecting, each read, *and* the whole body download, so a
server that drips one byte a second still ends the run on time.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from scheduler.hookspecs import hookimpl
from scheduler.params import TaskParams
from scheduler.types import TaskType

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from scheduler.types import RunContext

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
BODY_SHOWN = 4096
_SECRET = re.compile(r"auth|cookie|token|key|secret|passw|session|credential|signature", re.I)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
REDACTED = "[redacted]"


class HttpParams(TaskParams):
    """A mapping or list ``body`` is sent as JSON; ``expect_status`` defaults to any 2xx."""

    url: str = Field(description="http:// or https:// URL")
    method: str = Field(default="GET", description=f"one of {', '.join(METHODS)}")
    headers: dict[str, str] = Field(default_factory=dict, description="request headers")
    body: str | dict[str, Any] | list[Any] | None = Field(
        default=None, description="request body; a mapping or list is sent as JSON"
    )
    expect_status: int | list[int] | None = Field(
        default=None, description="accepted status code(s); default: any 2xx"
    )
    timeout: float = Field(default=30.0, gt=0, description="seconds")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        if any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("URL must not contain whitespace or control characters")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 -- raises ValueError for a bad port
        except ValueError as exc:
            raise ValueError(f"invalid URL: {exc}") from exc
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError("URL scheme must be http or https")
        if not parts.hostname:
            raise ValueError("URL has no host")
        return value

    @field_validator("method")
    @classmethod
    def _check_method(cls, value: str) -> str:
        method = value.upper()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        return method

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, val in value.items():
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            if any(c in val for c in "\r\n\0"):
                raise ValueError(f"header {name} contains a line break or NUL")
        return value

    @field_validator("expect_status")
    @classmethod
    def _check_status(cls, value: int | list[int] | None) -> int | list[int] | None:
        codes = [value] if isinstance(value, int) else (value or [])
        if isinstance(value, list) and not value:
            raise ValueError("expect_status must not be an empty list")
        for code in codes:
            if not 100 <= code <= 599:
                raise ValueError(f"{code} is not an HTTP status code (100..599)")
        return value


@hookimpl
def schedd_task_types() -> list[TaskType]:
    return [
        TaskType(
            name="http",
            target="schedd_plugins.http:run",
            summary="Make an HTTP(S) request; fail unless the status is expected",
            params=HttpParams,
        )
    ]


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


def redact_url(url: str) -> str:
    """The URL without its password and with secret-looking query values hidden."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if is_secret(k) else v) for k, v in pairs], safe="[]")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _header_lines(prefix: str, headers: Iterable[tuple[str, str]]) -> list[str]:
    return [f"{prefix} {k}: {REDACTED if is_secret(k) else v}" for k, v in headers]


def run(ctx: RunContext) -> int:
    import json
    import time
    import urllib.error
    import urllib.request

    p = HttpParams.model_validate(ctx.params)
    url, headers = _move_credentials(p.url, p.headers)
    data = None
    if p.body is not None:
        is_text = isinstance(p.body, str)
        data = p.body.encode() if isinstance(p.body, str) else json.dumps(p.body).encode()
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "text/plain; charset=utf-8" if is_text else "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=p.method)
    shown = redact_url(p.url)
    started = time.monotonic()
    try:
        try:
            response: Any = urllib.request.urlopen(request, timeout=p.timeout)
        except urllib.error.HTTPError as err:  # 4xx/5xx still carry a status and body
            response = err
        with response:
            status = int(response.status)
            head, size = _read_body(response, started + p.timeout)
            final_url, reply_headers = response.url, list(response.headers.items())
    except Exception as exc:  # URLError, timeouts, resets, protocol errors
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"schedd http: {p.method} {shown} failed: {reason}", file=sys.stderr)
        return 1
    elapsed_ms = round((time.monotonic() - started) * 1000)

    lines = [f"{p.method} {shown} -> {status} ({size} bytes, {elapsed_ms} ms)"]
    if final_url and final_url != url:
        lines.append(f"  redirected to {redact_url(final_url)}")
    lines += _header_lines(">", headers.items())
    lines += _header_lines("<", reply_headers)
    print("\n".join(lines))
    if head:
        print()
        print(_show_body(head, size))
    sys.stdout.flush()

    if _expected(status, p.expect_status):
        return 0
    print(
        f"schedd http: {p.method} {shown}: unexpected status {status} "
        f"(expected {_describe_expected(p.expect_status)})",
        file=sys.stderr,
    )
    return 1


def _move_credentials(url: str, headers: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    out = dict(headers)
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, out
    if not any(k.lower() == "authorization" for k in out):
        user, _, password = userinfo.partition(":")
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        out["Authorization"] = f"Basic {token}"
    return urlunsplit(parts._replace(netloc=host)), out


def _read_body(response: Any, deadline: float) -> tuple[bytes, int]:
    """Keep the first :data:`BODY_SHOWN` bytes, count the rest, stop at the deadline."""
    import time

    head = bytearray()
    size = 0
    read = getattr(response, "read1", response.read)  # read1: whatever has arrived
    while chunk := read(65536):
        size += len(chunk)
        if len(head) < BODY_SHOWN:
            head += chunk[: BODY_SHOWN - len(head)]
        if time.monotonic() > deadline:
            raise TimeoutError(f"body still downloading after the timeout ({size} bytes so far)")
    return bytes(head), size


def _show_body(head: bytes, size: int) -> str:
    if b"\0" in head:
        return f"(binary body, {size} bytes, not shown)"
    text = head.decode("utf-8", errors="replace").rstrip("\n")
    if size > len(head):
        text += f"\n... ({size - len(head)} more bytes not shown)"
    return text


def _expected(status: int, expect: int | list[int] | None) -> bool:
    if expect is None:
        return 200 <= status <= 299
    return status in ([expect] if isinstance(expect, int) else expect)


def _describe_expected(expect: int | list[int] | None) -> str:
    if expect is None:
        return "2xx"
    return " or ".join(str(c) for c in ([expect] if isinstance(expect, int) else expect))

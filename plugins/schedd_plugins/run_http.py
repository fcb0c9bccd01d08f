"""What an ``http`` run executes: the task function behind ``schedd_plugins.run_http:run``.

Standard library only, so a fresh fork that imports it pays next to nothing;
the metadata and parameter model live in :mod:`schedd_plugins.http` and
``ctx.params`` arrive already validated and normalised by that model.

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

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from scheduler.types import RunContext

BODY_SHOWN = 4096
_SECRET = re.compile(r"auth|cookie|token|key|secret|passw|session|credential|signature", re.I)
REDACTED = "[redacted]"


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

    p = ctx.params
    method: str = p.get("method", "GET").upper()
    timeout = float(p.get("timeout", 30.0))
    expect: int | list[int] | None = p.get("expect_status")
    url, headers = _move_credentials(p["url"], p.get("headers") or {})
    body = p.get("body")
    data = None
    if body is not None:
        is_text = isinstance(body, str)
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "text/plain; charset=utf-8" if is_text else "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    shown = redact_url(p["url"])
    started = time.monotonic()
    try:
        try:
            response: Any = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:  # 4xx/5xx still carry a status and body
            response = err
        with response:
            status = int(response.status)
            head, size = _read_body(response, started + timeout)
            final_url, reply_headers = response.url, list(response.headers.items())
    except Exception as exc:  # URLError, timeouts, resets, protocol errors
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"schedd http: {method} {shown} failed: {reason}", file=sys.stderr)
        return 1
    elapsed_ms = round((time.monotonic() - started) * 1000)

    lines = [f"{method} {shown} -> {status} ({size} bytes, {elapsed_ms} ms)"]
    if final_url and final_url != url:
        lines.append(f"  redirected to {redact_url(final_url)}")
    lines += _header_lines(">", headers.items())
    lines += _header_lines("<", reply_headers)
    print("\n".join(lines))
    if head:
        print()
        print(_show_body(head, size))
    sys.stdout.flush()

    if _expected(status, expect):
        return 0
    print(
        f"schedd http: {method} {shown}: unexpected status {status} "
        f"(expected {_describe_expected(expect)})",
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

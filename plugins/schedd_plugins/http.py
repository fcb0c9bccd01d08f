"""The ``http`` task type: make one HTTP(S) request and judge it by its status.

Metadata only (parameter model and hook); the run itself, with its redaction
of secrets in what it prints, is :func:`schedd_plugins.run_http.run`, which
imports no pydantic.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from scheduler.hookspecs import hookimpl
from scheduler.params import TaskParams
from scheduler.types import TaskType

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


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
            target="schedd_plugins.run_http:run",
            summary="Make an HTTP(S) request; fail unless the status is expected",
            params=HttpParams,
        )
    ]

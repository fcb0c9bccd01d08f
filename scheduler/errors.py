"""Located problems: the one error shape every user-facing check produces.

A config mistake must point at the file, line and column of the offending
key or value, and all problems must be reported at once, so checks collect
:class:`Problem` records instead of raising on the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    """One error or warning. ``line``/``col`` are 1-based; 0 means unknown."""

    path: str
    line: int = 0
    col: int = 0
    message: str = ""
    severity: Literal["error", "warning"] = field(default="error", compare=False)

    def __str__(self) -> str:
        where = self.path
        if self.line:
            where += f":{self.line}"
            if self.col:
                where += f":{self.col}"
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {prefix}{self.message}"


class ScheddError(Exception):
    """Base for errors the CLI reports as one clear line (no traceback)."""


class ConfigError(ScheddError):
    """The config file is invalid; ``problems`` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PluginError(ScheddError):
    """A plugin could not be loaded and loading is strict, or plugins conflict."""

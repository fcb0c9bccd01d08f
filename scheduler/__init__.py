"""schedd: a plugin-driven job scheduler daemon.

Nothing is imported here on purpose: every CLI command pays only for the
modules it uses, and plugins import the small modules they need directly.
"""

from __future__ import annotations

__version__ = "0.1.0"

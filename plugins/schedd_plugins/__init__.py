"""schedd's built-in task plugins: ``shell``, ``python`` and ``http``.

Each module is registered under the ``schedd`` entry-point group in schedd's own
``pyproject.toml``, exactly like a third-party plugin, so the built-ins take the
same loading, checking and blocking path as everything else. Module imports stay
cheap: the heavy lifting (subprocess, urllib) is imported inside ``run``, which
only the isolated child calls.
"""

from __future__ import annotations

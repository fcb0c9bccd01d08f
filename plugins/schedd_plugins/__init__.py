"""schedd's built-in task plugins: ``shell``, ``python`` and ``http``.

Each task has two modules. ``shell``/``python``/``http`` hold the metadata the
daemon imports (the hook, the pydantic parameter model) and are registered
under the ``schedd`` entry-point group in schedd's own ``pyproject.toml``,
exactly like a third-party plugin, so the built-ins take the same loading,
checking and blocking path as everything else. ``run_shell``/``run_python``/
``run_http`` hold the task functions the isolated child calls: standard
library only (heavier modules such as ``subprocess`` and ``urllib`` imported
inside ``run``), so the launcher preloads them for free and a fresh fork never
imports pydantic or pluggy.
"""

from __future__ import annotations

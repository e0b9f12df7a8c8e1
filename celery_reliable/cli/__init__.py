"""``celery reliable ...`` and ``celery reliable-reaper``: Celery's own CLI, extended.

Registered through the ``celery.commands`` entry point group. This module is imported by
every ``celery`` invocation (``celery worker`` too), so it imports nothing heavy at module
level and never the user's app.
"""

from __future__ import annotations

from .dlq import dlq
from .group import reliable
from .status import status

reliable.add_command(dlq)
reliable.add_command(status)

__all__ = ["reliable"]

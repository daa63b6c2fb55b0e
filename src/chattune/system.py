"""Facts about the machine this process runs on."""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on (affinity-aware, so containers and taskset are respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1

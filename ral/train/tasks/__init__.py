"""Embedded tasks for ``ral train``. ``get_task(name)`` builds one by name."""

from __future__ import annotations

from .grounding import GroundingTask
from .zoomsearch import ZoomSearchTask

TASKS = {"grounding": GroundingTask, "zoomsearch": ZoomSearchTask}


def get_task(name: str, **kwargs):
    if name not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name](**kwargs)


__all__ = ["get_task", "TASKS"]

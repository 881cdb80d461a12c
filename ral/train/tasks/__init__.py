"""Embedded tasks for ``ral train``. ``get_task(name)`` builds one by name."""

from __future__ import annotations

from ...checks import check_choice
from .grounding import GroundingTask
from .zoomsearch import ZoomSearchTask

TASKS = {"grounding": GroundingTask, "zoomsearch": ZoomSearchTask}


def get_task(name: str, **kwargs):
    check_choice("task", name, tuple(TASKS))
    return TASKS[name](**kwargs)


__all__ = ["get_task", "TASKS"]

"""Embedded tasks for ``ral train``. ``get_task(name)`` builds one by name."""

from __future__ import annotations


def get_task(name: str, **kwargs):
    if name == "grounding":
        from .grounding import GroundingTask
        return GroundingTask(**kwargs)
    if name == "zoomsearch":
        from .zoomsearch import ZoomSearchTask
        return ZoomSearchTask(**kwargs)
    raise ValueError(f"task must be one of ('grounding', 'zoomsearch'), got {name!r}")


__all__ = ["get_task"]

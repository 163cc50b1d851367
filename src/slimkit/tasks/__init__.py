"""Tasks: built-in tasks on bundled data, and loading a user's ``module:function`` task."""

from slimkit.tasks.base import BUILTIN_TASKS, Task, load_task

__all__ = ["BUILTIN_TASKS", "Task", "load_task"]

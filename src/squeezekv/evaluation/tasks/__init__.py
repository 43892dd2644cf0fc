"""The task registry: each task turns documents into samples and scores one cell on a batch of them.

A task is one small module defining a :class:`Task` subclass decorated with :func:`register_task`.
``config=None`` always means the full cache. ``prepare`` computes, once per batch, what every cell
needs from the full cache (e.g. its greedy continuation); ``evaluate`` scores one cell.
Tasks that a peer library can run describe a peer job per sample and score the peer's raw output
with the same code as their own cells.
"""

from squeezekv.evaluation.tasks import drift, fidelity, longbench, passkey, ppl, ruler  # noqa: F401  (registers them)
from squeezekv.evaluation.tasks.base import (
    TASKS,
    AnswerTask,
    Sample,
    Task,
    TaskOptions,
    model_context,
    register_task,
    task_named,
)

__all__ = [
    "TASKS",
    "AnswerTask",
    "Sample",
    "Task",
    "TaskOptions",
    "model_context",
    "register_task",
    "task_named",
]

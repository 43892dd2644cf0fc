"""Evaluating KV-cache compression: quality per budget for every policy × allocator at equal memory.

``squeezekv eval`` runs a task's samples through the full cache and every cell of a
budget × policy × allocator grid (optionally a peer library's presses too) and writes
``results.jsonl``, ``summary.md`` and plots; ``squeezekv profile`` shows per-layer similarity,
the budgets it leads to, and how stable the layer grouping is across prompts.
"""

from squeezekv.evaluation.grid import Cell, EvalConfig
from squeezekv.evaluation.runner import run_eval
from squeezekv.evaluation.tasks import TASKS, Task, TaskOptions, register_task

__all__ = ["TASKS", "Cell", "EvalConfig", "Task", "TaskOptions", "register_task", "run_eval"]

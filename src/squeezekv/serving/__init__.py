"""Serving: continuous batching over compressed, paged KV caches, and an OpenAI-compatible server.

``store`` (the block pool), ``batch`` (the decode step's cache over it), ``scheduler`` (admission,
prefill, decode), ``app`` (the HTTP endpoints; needs the optional ``squeezekv[serve]``).
"""

from squeezekv.serving.scheduler import QueueFull, Request, ServingEngine

__all__ = ["QueueFull", "Request", "ServingEngine"]

"""squeezekv: two-dimensional KV-cache compression (SqueezeAttention) for Hugging Face transformers."""

from squeezekv.allocators import ALLOCATORS, register_allocator
from squeezekv.cache import SqueezeCache
from squeezekv.config import SqueezeConfig
from squeezekv.generation import GenerationResult, GenerationStats, generate
from squeezekv.policies import POLICIES, register_policy
from squeezekv.session import Session, compress

__all__ = [
    "ALLOCATORS",
    "POLICIES",
    "GenerationResult",
    "GenerationStats",
    "Session",
    "SqueezeCache",
    "SqueezeConfig",
    "compress",
    "generate",
    "register_allocator",
    "register_policy",
]

"""squeezekv: two-dimensional KV-cache compression (SqueezeAttention) for Hugging Face transformers."""

from squeezekv.allocators import ALLOCATORS, Allocator, register_allocator, resolve_allocator
from squeezekv.cache import SqueezeCache
from squeezekv.config import SqueezeConfig
from squeezekv.generation import GenerationResult, GenerationStats, generate
from squeezekv.policies import POLICIES, Policy, register_policy, resolve_policy
from squeezekv.session import Session, compress

__all__ = [
    "ALLOCATORS",
    "POLICIES",
    "Allocator",
    "GenerationResult",
    "GenerationStats",
    "Policy",
    "Session",
    "SqueezeCache",
    "SqueezeConfig",
    "compress",
    "generate",
    "register_allocator",
    "register_policy",
    "resolve_allocator",
    "resolve_policy",
]

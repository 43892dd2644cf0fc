"""One rank of a tensor-parallel squeezekv run; start it with ``torchrun`` (see test_distributed.py).

Loads each saved tiny model in turn with transformers' tensor parallelism over all ranks (one
launch for several models: starting ranks costs more than a model's run), runs every case of
``CASES`` through ``model.generate`` inside ``squeezekv.compress`` and through the fast engine, and
writes what the rank did (output tokens, budgets, the tokens each local head keeps) to
``<out>/model-<index>-rank-<rank>.json``. ``single_process`` runs the same cases in one process
for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.engine import FastGenerator

from models import left_pad, prompts, short_policy

NEW_TOKENS = 12
CASES = {
    "keep-everything": dict(budget=1000, policy="window", allocator="uniform"),
    **{
        f"{policy}-squeeze": dict(budget=0.3, policy=short_policy(policy, window=8), allocator="squeeze")
        for policy in sorted(squeezekv.POLICIES)
        if policy != "adakv"  # head-wise: refused under tensor parallelism (tests/test_session.py)
    },
}
DISAGREEING = "h2o-squeeze"  # in this case every rank but the first plans other budgets


def batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_pad(prompts([40, 29, 35], seed=3))
    return ids.to(device), mask.to(device)


def kept_tokens(layer) -> list[list[list[int]]]:
    """``[batch][heads][columns]``: the columns each head of each sequence holds, sorted."""
    return [
        [sorted(p[v].tolist()) for p, v in zip(positions, valid, strict=True)]
        for positions, valid in zip(layer.positions.cpu(), layer.valid.cpu(), strict=True)
    ]


def run_case(model, options: dict, device: str, cuda_graphs: bool) -> dict:
    ids, mask = batch(device)
    config = SqueezeConfig(**options)
    with squeezekv.compress(model, config, max_new_tokens=NEW_TOKENS) as session:
        simple = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        budgets = session.cache.budgets.tolist()
        kept = [kept_tokens(layer) for layer in session.cache.layers]
    generator = FastGenerator(model, config, cuda_graphs=cuda_graphs)
    fast = generator.generate(ids, mask, max_new_tokens=NEW_TOKENS, prefill_batch=2)
    return {
        "sequences": simple.tolist(),
        "budgets": budgets,
        "kept": kept,
        "fast_sequences": fast.sequences.tolist(),
        "fast_kept": [kept_tokens(layer) for layer in generator.cache.layers],
    }


def single_process(model_dir: str, device: str = "cpu") -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="sdpa")
    model.to(device)
    ids, mask = batch(device)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    cases = {name: run_case(model, options, device, cuda_graphs=False) for name, options in CASES.items()}
    return {"plain_sequences": plain.tolist(), "cases": cases}


@contextmanager
def disagreeing_plan(rank: int):
    """Makes ranks other than the first plan the layers' budgets in reverse order."""
    plan = SqueezeConfig.plan_budgets
    if rank > 0:
        SqueezeConfig.plan_budgets = lambda *args, **kwargs: plan(*args, **kwargs).flip(-1)
    try:
        yield
    finally:
        SqueezeConfig.plan_budgets = plan


def main() -> None:
    from transformers.distributed import DistributedConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("model_dirs", nargs="+", help="run one after another in the same ranks")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, CUDA-graph decode)")
    arguments = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    on_gpu = arguments.device != "cpu"
    for index, model_dir in enumerate(arguments.model_dirs):
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=torch.float64,
            attn_implementation="sdpa",
            distributed_config=DistributedConfig(tp_size=world),
        )
        rank = torch.distributed.get_rank()
        device = f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu"
        cases = {}
        for name, options in CASES.items():
            with disagreeing_plan(rank if name == DISAGREEING else 0):
                cases[name] = run_case(model, options, device, cuda_graphs=on_gpu)
        local_heads = model.config.num_key_value_heads // world
        record = {"rank": rank, "world": world, "local_kv_heads": local_heads, "cases": cases}
        Path(arguments.out, f"model-{index}-rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()

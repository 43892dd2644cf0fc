"""Tensor parallel (two gloo ranks on the CPU, NCCL on GPUs) and device_map against one process."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from squeezekv import SqueezeConfig
from squeezekv.distributed import agree, local_parameter_bytes, model_devices, tensor_parallel_size

from models import short_policy, tiny_model
from tensor_parallel_worker import CASES, single_process

TESTS = Path(__file__).parent
RANKS = 2


def run_ranks(model_dirs: list[Path], out: Path, device: str = "cpu", ranks: int = RANKS) -> list[list[dict]]:
    """Each model's records, one per rank, from one launch of ``ranks`` processes."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    if device == "cpu":  # transformers puts tensor-parallel ranks on the GPUs it sees
        environment["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command += [str(TESTS / "tensor_parallel_worker.py"), str(out), *map(str, model_dirs), "--device", device]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [
        [json.loads((out / f"model-{index}-rank-{rank}.json").read_text()) for rank in range(ranks)]
        for index in range(len(model_dirs))
    ]


def saved_tiny_model(directory: Path, family: str = "llama") -> Path:
    tiny_model(family).save_pretrained(directory)
    return directory


FAMILIES = ["llama", "mistral", "qwen2"]  # Mistral for its sliding window; Qwen2 for its projections' biases


@pytest.fixture(scope="module")
def tensor_parallel_runs(tmp_path_factory) -> dict[str, tuple[list[dict], dict]]:
    """Each family's rank records and its single-process run."""
    model_dirs = [saved_tiny_model(tmp_path_factory.mktemp(family), family) for family in FAMILIES]
    runs = run_ranks(model_dirs, tmp_path_factory.mktemp("ranks"))
    return {
        family: (ranks, single_process(str(model_dir)))
        for family, model_dir, ranks in zip(FAMILIES, model_dirs, runs, strict=True)
    }


def check_against_single_process(ranks: list[dict], single: dict) -> None:
    """What a tensor-parallel run must show: one plan, one decision per head, one output."""
    for name in CASES:
        alone = single["cases"][name]
        for record in ranks:
            case, heads = record["cases"][name], record["local_kv_heads"]
            assert case["budgets"] == alone["budgets"], name  # planned once, agreed by every rank
            assert case["sequences"] == alone["sequences"], name
            assert case["fast_sequences"] == case["sequences"], name
            for layer, (kept, fast_kept, kept_alone) in enumerate(
                zip(case["kept"], case["fast_kept"], alone["kept"], strict=True)
            ):
                assert kept == fast_kept, (name, layer)
                for row, row_alone in zip(kept, kept_alone, strict=True):
                    if len(row_alone) == 1:  # head-shared: every rank keeps the same tokens
                        assert row == row_alone, (name, layer)
                    else:  # per head: this rank's heads decide as on one process
                        first = record["rank"] * heads
                        assert row == row_alone[first : first + heads], (name, layer)
    keep_everything = ranks[0]["cases"]["keep-everything"]
    assert keep_everything["sequences"] == single["plain_sequences"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_ranks_agree_with_one_process(tensor_parallel_runs, family):
    ranks, single = tensor_parallel_runs[family]
    assert [record["local_kv_heads"] for record in ranks] == [1, 1]
    check_against_single_process(ranks, single)


def test_single_rank_helpers_are_identities():
    model = tiny_model("llama")
    assert tensor_parallel_size(model) == 1
    assert model_devices(model) == [torch.device("cpu")]
    assert local_parameter_bytes(model) == sum(p.numel() * 8 for p in model.parameters())
    budgets = torch.tensor([[3, 4]])
    assert agree(budgets, None, torch.device("cpu")) is budgets


@pytest.mark.skipif(torch.cuda.device_count() < RANKS, reason=f"needs {RANKS} CUDA devices")
def test_tensor_parallel_over_gpus_with_cuda_graphs(tmp_path):
    model_dir = saved_tiny_model(tmp_path / "model")
    (tmp_path / "ranks").mkdir()
    (ranks,) = run_ranks([model_dir], tmp_path / "ranks", device="cuda")
    check_against_single_process(ranks, single_process(str(model_dir), "cuda"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("policy", ["h2o", "window"])
def test_device_map_keeps_each_layer_on_its_device_and_changes_nothing(policy):
    from accelerate import dispatch_model

    from squeezekv.engine import FastGenerator
    from squeezekv.generation import generate

    from tensor_parallel_worker import NEW_TOKENS, batch, kept_tokens

    config = SqueezeConfig(budget=0.3, policy=short_policy(policy), allocator="squeeze")
    layers = tiny_model("llama").config.num_hidden_layers
    half = {f"model.layers.{index}": int(index >= layers // 2) for index in range(layers)}
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, **half, "model.norm": 1, "lm_head": 1}
    spread = dispatch_model(copy.deepcopy(tiny_model("llama")), device_map)
    alone = copy.deepcopy(tiny_model("llama")).to("cuda:0")
    ids, mask = batch("cuda:0")
    runs = {}
    for name, model in (("spread", spread), ("alone", alone)):
        simple = generate(model, ids, config, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        generator = FastGenerator(model, config, cuda_graphs=False)
        fast = generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
        runs[name] = simple, fast, [kept_tokens(layer) for layer in generator.cache.layers]
        if name == "spread":
            held = [layer.keys.device.index for layer in generator.cache.layers]
            assert held == [device_map[f"model.layers.{index}"] for index in range(layers)]
    (simple, fast, kept), (simple_alone, _, kept_alone) = runs["spread"], runs["alone"]
    assert torch.equal(simple.sequences.cpu(), simple_alone.sequences.cpu())
    assert torch.equal(simple.stats.layer_budget, simple_alone.stats.layer_budget)
    assert torch.equal(fast.sequences.cpu(), simple.sequences.cpu())
    assert kept == kept_alone
    with pytest.raises(ValueError, match="device_map"):
        FastGenerator(spread, config)

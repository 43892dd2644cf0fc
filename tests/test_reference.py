"""The bundled reference model and held-out data load offline and behave like a trained model.

These run on CPU in well under a minute; they guard the artefacts every quality claim in the project
depends on, and the training code path that rebuilds them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from squeezekv import reference  # noqa: E402
from squeezekv.reference import (  # noqa: E402
    PASSKEY_QUESTION,
    REFERENCE_MODEL,
    load_heldout,
    passkey_prompt,
    random_passkey,
    reference_model_path,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _import_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(reference_model_path()))


@pytest.fixture(scope="module")
def model():
    m = AutoModelForCausalLM.from_pretrained(str(reference_model_path()), dtype=torch.float32)
    return m.eval()


def _nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:]).item()


def test_model_and_data_are_found_under_one_root(tmp_path, monkeypatch):
    path = reference_model_path()
    assert path == reference.DATA_ROOT / "models" / REFERENCE_MODEL and (path / "config.json").is_file()
    monkeypatch.setattr(reference, "DATA_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="SQUEEZEKV_HOME"):
        reference_model_path()
    with pytest.raises(FileNotFoundError, match="SQUEEZEKV_HOME"):
        load_heldout("short")


def test_squeezekv_home_sets_the_root(tmp_path):
    """The setting is read once, at import: a fresh interpreter sees it."""
    code = "from squeezekv.reference import DATA_ROOT; print(DATA_ROOT)"
    env = {**os.environ, "SQUEEZEKV_HOME": str(tmp_path)}
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(tmp_path)


def test_config_shape_and_size(model):
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert cfg.num_hidden_layers >= 16
    assert cfg.max_position_embeddings == 4096
    assert cfg.num_attention_heads == 8 and cfg.num_key_value_heads == 2
    assert 20e6 <= sum(p.numel() for p in model.parameters()) <= 25e6
    size = sum(f.stat().st_size for f in reference_model_path().iterdir() if f.is_file())
    assert size <= 48 * 1024 * 1024


def test_tokenizer_special_tokens(tokenizer):
    ids = tokenizer("The pass key is 12345.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id is not None and tokenizer.eos_token_id != tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The pass key is 12345."


def test_generate_runs(model, tokenizer):
    x = tokenizer("The function returns", return_tensors="pt")
    out = model.generate(**x, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == x["input_ids"].shape[1] + 6


def test_heldout_splits():
    long_docs = load_heldout("long")
    short_docs = load_heldout("short")
    assert len(long_docs) >= 200 and len(short_docs) >= 100
    assert {"id", "source", "text"} <= set(long_docs[0])
    assert not {d["id"] for d in long_docs} & {d["id"] for d in short_docs}
    with pytest.raises(ValueError, match="long, short"):
        load_heldout("train")


def test_heldout_ppl_far_below_random_init(model, tokenizer):
    docs = load_heldout("short")[:4]
    ids = torch.tensor([tokenizer(d["text"])["input_ids"][:256] for d in docs])
    trained = math.exp(_nll(model, ids))
    torch.manual_seed(0)
    random_model = LlamaForCausalLM(model.config).eval()
    untrained = math.exp(_nll(random_model, ids))
    assert untrained > 0.5 * model.config.vocab_size  # a random model is about uniform
    assert trained < untrained / 50


def test_passkey_prompt_length(tokenizer):
    rng = random.Random(0)
    key = random_passkey(rng)
    assert len(key) == 5
    p = passkey_prompt(tokenizer, 1024, depth=0.5, key=key)
    n = len(tokenizer(p.prompt)["input_ids"])
    assert 1024 - 40 <= n <= 1024 and key in p.prompt and p.answer.strip().startswith(key)
    with pytest.raises(ValueError):
        passkey_prompt(tokenizer, 1024, depth=1.5, key=key)


def test_training_smoke_cpu(tmp_path, tokenizer):
    """A few steps of a tiny model through the same code path as the GPU run."""
    train_model = _import_script("train_model")
    text = " ".join(d["text"] for d in load_heldout("short")[:3])
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.uint16)
    data = tmp_path / "tiny.u16"
    ids.tofile(data)
    cfg = train_model.TrainConfig(
        data=str(data),
        tokenizer_dir=str(reference_model_path()),
        out=str(tmp_path / "out"),
        device="cpu",
        tiny=True,
        seq_len=128,
        batch_size=2,
        steps=3,
        warmup_steps=1,
        synthetic_prob=0.5,
        synthetic_pool=2,
        answer_loss_weight=20.0,
        skip_eval=True,
    )
    report = train_model.train(cfg)
    assert report["steps"] == 3 and math.isfinite(report["final_loss"])
    assert report["synthetic"]["docs_inserted"] == 0 or report["synthetic"]["answer_tokens"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(cfg.out)
    assert reloaded.config.num_hidden_layers == 2


def test_passkey_depth_power_puts_keys_further_from_the_question(tokenizer):
    """``--passkey-depth-power 2`` draws depths as ``u**2``: keys sit earlier, in both kinds."""
    train_model = _import_script("train_model")
    text = " ".join(d["text"] for d in load_heldout("short")[:3])
    stream = np.array(tokenizer(text)["input_ids"], dtype=np.uint16)

    def mean_depth(power: float) -> float:
        docs = train_model.SyntheticDocs(
            tokenizer, stream, random.Random(0), passkey_share=1.0, depth_power=power
        )
        depths = []
        for _ in range(40):
            _, body, _ = docs.passkey(300)
            question = body.rindex(PASSKEY_QUESTION)
            depths.append(body.index("The pass key is ") / question)
        return sum(depths) / len(depths)

    uniform, skewed = mean_depth(1.0), mean_depth(2.0)
    assert 0.35 < uniform < 0.65 and skewed < uniform - 0.1


def test_synthetic_answers_are_the_asked_keys(tokenizer):
    """Each synthetic document's answer tokens decode to exactly the keys asked for after the questions,
    each with the full stop that ends it, and only those targets get the answer loss weight."""
    train_model = _import_script("train_model")
    text = " ".join(d["text"] for d in load_heldout("short")[:3])
    stream = np.array(tokenizer(text)["input_ids"], dtype=np.uint16)
    docs = train_model.SyntheticDocs(tokenizer, stream, random.Random(1), passkey_share=0.5)
    kinds = set()
    for _ in range(30):
        doc = docs.sample(600)
        kinds.add(doc.kind)
        decoded = tokenizer.decode(doc.ids, skip_special_tokens=True)
        questions = "\nWhat is the number for" if doc.kind == "kv" else PASSKEY_QUESTION
        tail = decoded[decoded.index(questions) if doc.kind == "kv" else decoded.rindex(questions) :]
        asked = re.findall(r"(?:pass key is|It is) (\d+\.)", tail)
        runs = np.split(np.array(doc.answers), np.flatnonzero(np.diff(doc.answers) != 1) + 1)
        got = [tokenizer.decode([doc.ids[i] for i in run]).strip() for run in runs]
        assert got == asked and asked, (doc.kind, got, asked)
    assert kinds == {"passkey_filler", "passkey_text", "kv"}

    weights = train_model._answer_weights([(1, doc)], (2, 600), 50.0, torch.device("cpu"))
    assert weights is not None and weights[0].eq(1).all()
    assert weights[1].eq(50).nonzero().flatten().tolist() == [i - 1 for i in doc.answers]
    assert train_model._answer_weights([(1, doc)], (2, 600), 1.0, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="--answer-loss-weight -1.0"):
        train_model.TrainConfig(data="", tokenizer_dir="", out="", answer_loss_weight=-1.0)

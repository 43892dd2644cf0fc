import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.importance import summed_similarity

from models import prompts, tiny_model


def test_similarity_sums_ignore_padding():
    residual = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    attention = torch.tensor([[[5.0, 5.0], [0.0, 1.0], [0.0, 3.0]]])
    valid = torch.tensor([[False, True, True]])
    expected = (torch.tensor(1 / 2**0.5) + 1.0) / 2
    total, count = summed_similarity(residual, attention, valid)
    torch.testing.assert_close(total / count, expected.view(1))


def manual_similarity(model, ids, layers, attention_name):
    """cos(residual in, residual + attention out) per layer, captured without squeezekv."""
    captured = {}
    handles = []
    for index, layer in enumerate(layers):
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, a, k, i=index: captured.__setitem__(("in", i), a[0] if a else k["hidden_states"]),
                with_kwargs=True,
            )
        )
        handles.append(
            getattr(layer, attention_name).register_forward_hook(
                lambda m, a, o, i=index: captured.__setitem__(("out", i), o[0])
            )
        )
    model(ids)
    for handle in handles:
        handle.remove()
    return torch.stack(
        [
            torch.nn.functional.cosine_similarity(
                captured["in", i], captured["in", i] + captured["out", i], dim=-1
            ).mean()
            for i in range(len(layers))
        ]
    )


def test_similarity_is_measured_on_the_residual_stream_for_sequential_and_parallel_layers():
    for family, path, attention_name in [
        ("llama", "model.layers", "self_attn"),
        ("gpt_neox", "gpt_neox.layers", "attention"),
    ]:
        model = tiny_model(family)
        layers = model
        for name in path.split("."):
            layers = getattr(layers, name)
        ids = prompts([30])[0][None]
        expected = manual_similarity(model, ids, list(layers), attention_name)
        result = squeezekv.generate(model, ids, SqueezeConfig(budget=0.5), max_new_tokens=2, do_sample=False)
        torch.testing.assert_close(result.stats.layer_similarity[0], expected.float())

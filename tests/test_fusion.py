from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

import squeezekv.fusion
from squeezekv.architectures import architecture_of, decoder_layers
from squeezekv.engine import compiled_parts
from squeezekv.fusion import fused_projections

from models import FAMILIES, prompts, tiny_model


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def fused_groups(model) -> list[list[torch.nn.Linear]]:
    architecture = architecture_of(model)
    groups = []
    for layer in decoder_layers(model, architecture):
        attention = getattr(layer, architecture.attention)
        groups.append([getattr(attention, name) for name in architecture.projections])
        if architecture.gated_mlp:
            groups.append([layer.mlp.gate_proj, layer.mlp.up_proj])
    return [group for group in groups if group]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_projections_give_the_same_logits_and_the_model_back_as_it_was(family):
    model = tiny_model(family, "eager")
    architecture = architecture_of(model)
    groups = fused_groups(model)
    ids = torch.stack(prompts([9, 9], seed=4))
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    products = []

    def counted(*args, **kwargs):
        products.append(args[1].shape)
        return F.linear(*args, **kwargs)

    with torch.inference_mode():
        plain = model(ids).logits
        with fused_projections(model, architecture):
            for group in groups:  # one tensor behind each group, no second copy
                assert len({storage(member.weight) for member in group}) == 1
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(squeezekv.fusion, "F", SimpleNamespace(linear=counted))
                fused = model(ids).logits
        after = model(ids).logits
    assert len(products) == len(groups)  # each group ran as one product
    torch.testing.assert_close(fused, plain, atol=1e-12, rtol=1e-12)
    assert torch.equal(after, plain)
    assert all("forward" not in module.__dict__ for module in model.modules())
    parameters = [parameter for group in groups for member in group for parameter in member.parameters()]
    assert len({storage(parameter) for parameter in parameters}) == len(parameters)
    assert not any(parameter.is_inference() for parameter in parameters)  # still trainable
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    if family in ("phi3", "gpt_neox", "falcon", "opt"):  # nothing to join
        assert not groups


def test_a_projection_with_a_hook_keeps_its_own_product():
    model = tiny_model("llama")
    architecture = architecture_of(model)
    first, second, third = (layer.self_attn for layer in decoder_layers(model, architecture)[:3])
    seen = []
    first.k_proj.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    second.v_proj._hf_hook = object()  # accelerate's hooks replace forward instead of registering
    with torch.inference_mode(), fused_projections(model, architecture):
        assert storage(first.q_proj.weight) != storage(first.k_proj.weight)
        assert storage(second.q_proj.weight) != storage(second.v_proj.weight)
        assert storage(third.q_proj.weight) == storage(third.k_proj.weight)
        model(torch.stack(prompts([5], seed=1)))
    assert len(seen) == 1


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fused_mlps_still_compile_to_one_graph_per_kind(family):
    model = tiny_model(family, "eager")
    architecture = architecture_of(model)
    layers = decoder_layers(model, architecture)
    kinds = {type(getattr(layer, name)) for layer in layers for name in architecture.compiled}
    graphs = []

    def counting(graph_module, inputs):
        graphs.append(graph_module)
        return graph_module.forward

    ids = torch.stack(prompts([9, 9], seed=3))
    with torch.inference_mode():
        plain = model(ids).logits
        with (
            fused_projections(model, architecture),
            compiled_parts(model, architecture, backend=counting),
        ):
            compiled = model(ids).logits
    assert len(graphs) == len(kinds) + len(architecture.compiled_functions)
    torch.testing.assert_close(compiled, plain, atol=1e-12, rtol=1e-12)

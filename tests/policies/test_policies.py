"""Each policy keeps exactly the tokens a plain, one-sequence-at-a-time reference keeps."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from squeezekv.policies import H2O, POLICIES, LayerView, Policy, SnapKV, Streaming, Window, select
from squeezekv.policies.chunk import ChunkKV
from squeezekv.policies.reconstruct import Reconstruct


def reference_keep(policy, tokens, budget, phase, prompt_columns, first_column):
    """``tokens``: (position, score) of the valid tokens; returns the kept positions.

    Tokens are taken group by group: the group a policy always keeps first, then by its ranking;
    every tie goes to the more recent token.
    """
    newest_first = sorted(tokens, key=lambda t: -t[0])
    by_score = sorted(tokens, key=lambda t: (-t[1], -t[0]))
    if isinstance(policy, Window):
        order = newest_first
    elif isinstance(policy, Streaming):
        sinks = [t for t in tokens if t[0] < first_column + policy.sinks]
        order = sorted(sinks, key=lambda t: -t[0]) + [t for t in newest_first if t not in sinks]
    elif isinstance(policy, H2O):
        recent = newest_first[: min(budget, max(1, math.floor(budget * policy.recent_ratio)))]
        order = recent + [t for t in by_score if t not in recent]
    elif isinstance(policy, Reconstruct):
        fresh = [t for t in newest_first if t[0] >= prompt_columns]
        order = fresh + [t for t in by_score if t not in fresh]
    elif phase == "prefill" and isinstance(policy, ChunkKV):
        window = [t for t in newest_first if t[0] >= prompt_columns - policy.window]
        chunks = prompt_columns // policy.chunk

        def chunk(t):
            return min(max((t[0] - first_column) // policy.chunk, 0), chunks)

        totals = {}
        for t in tokens:
            totals[chunk(t)] = totals.get(chunk(t), 0.0) + t[1]
        by_chunk = sorted(tokens, key=lambda t: (-totals[chunk(t)], -t[0]))
        order = window + [t for t in by_chunk if t not in window]
    elif phase == "prefill":  # snapkv
        window_start = prompt_columns - policy.window
        window = [t for t in newest_first if t[0] >= window_start]
        order = window + [t for t in by_score if t not in window]
    else:
        pinned = [t for t in newest_first if t[0] < prompt_columns - policy.window]
        order = pinned + [t for t in newest_first if t not in pinned]
    return {position for position, _ in order[:budget]}


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    phase=st.sampled_from(["prefill", "decode"]),
    slots=st.integers(1, 30),
    batch=st.integers(1, 3),
    heads=st.sampled_from([1, 2]),
    sinks=st.integers(0, 4),
    recent_ratio=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    snapkv_window=st.integers(1, 8),
    data=st.data(),
)
def test_policy_keeps_what_the_reference_keeps(
    policy, phase, slots, batch, heads, sinks, recent_ratio, snapkv_window, data
):
    settings = {
        "streaming": {"sinks": sinks},
        "h2o": {"recent_ratio": recent_ratio},
        "snapkv": {"window": snapkv_window},
        "chunkkv": {"window": snapkv_window, "chunk": sinks + 1},
    }
    policy = POLICIES[policy](**settings.get(policy, {}))
    gaps = data.draw(st.lists(st.integers(1, 3), min_size=slots, max_size=slots))
    positions = torch.tensor(gaps).cumsum(0).expand(batch, heads, slots).contiguous()
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=batch * slots, max_size=batch * slots)))
    valid = valid.view(batch, 1, slots).expand(batch, heads, slots)
    scores = torch.tensor(
        data.draw(
            st.lists(st.integers(0, 4), min_size=batch * heads * slots, max_size=batch * heads * slots)
        ),
        dtype=torch.float32,
    ).view(batch, heads, slots)
    budget = torch.tensor(
        data.draw(st.lists(st.integers(policy.min_tokens(), 30), min_size=batch, max_size=batch))
    )
    prompt_columns = int(positions.max()) + 1 - data.draw(st.integers(0, 5))

    first_column = torch.tensor(data.draw(st.lists(st.integers(0, 6), min_size=batch, max_size=batch)))
    view = LayerView(positions, valid, scores, phase, prompt_columns, first_column)
    priority = policy.ranking(view, budget).expand(batch, heads, slots)
    chosen, kept = select(priority, valid, budget)

    for b in range(batch):
        for h in range(heads):
            tokens = [
                (int(positions[b, h, s]), float(scores[b, h, s])) for s in range(slots) if valid[b, h, s]
            ]
            expected = reference_keep(
                policy, tokens, int(budget[b]), phase, prompt_columns, int(first_column[b])
            )
            got = {
                int(positions[b, h, s])
                for s, k in zip(chosen[b, h].tolist(), kept[b, h].tolist(), strict=True)
                if k
            }
            assert got == expected
            assert chosen[b, h].tolist() == sorted(chosen[b, h].tolist())  # slots stay in position order


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Streaming(sinks="3"), r"policy 'streaming': sinks='3' must be an integer"),
        (lambda: Streaming(sinks=1.5), r"sinks=1.5 must be an integer"),
        (lambda: Streaming(sinks=True), r"sinks=True must be an integer"),
        (lambda: Streaming(sinks=-1), r"sinks=-1 must be an integer >= 0"),
        (lambda: SnapKV(window=2.5), r"policy 'snapkv': window=2.5 must be an integer"),
        (lambda: SnapKV(kernel=4), r"kernel=4 must be an odd integer"),
        (lambda: H2O(recent_ratio="x"), r"recent_ratio='x' must be a number"),
        (lambda: H2O(recent_ratio=1.5), r"recent_ratio=1.5 must be in \[0, 1\]"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_settings_become_python_numbers():
    policy = Streaming(sinks=np.int64(3))
    assert policy.sinks == 3 and type(policy.sinks) is int
    ratio = H2O(recent_ratio=np.float32(0.25)).recent_ratio
    assert ratio == 0.25 and type(ratio) is float


def test_a_policy_overriding_fold_must_say_whether_it_adds():
    with pytest.raises(TypeError, match="overrides fold, so it must set adds_mass"):

        class Decayed(Policy):
            def fold(self, scores, mass, phase):
                return 0.9 * scores + mass

    class Added(Policy):
        adds_mass = True

        def fold(self, scores, mass, phase):
            return mass + scores

    assert Added.adds_mass and not SnapKV.adds_mass and H2O.adds_mass

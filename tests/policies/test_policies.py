"""Each policy keeps exactly the tokens a plain, one-sequence-at-a-time reference keeps."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from squeezekv import SqueezeConfig
from squeezekv.policies import POLICIES, LayerView, ranking, select


def reference_keep(policy, tokens, budget, config, phase, prompt_columns, first_column):
    """``tokens``: (position, score) of the valid tokens; returns the kept positions.

    Tokens are taken group by group: the group a policy always keeps first, then by its ranking;
    every tie goes to the more recent token.
    """
    newest_first = sorted(tokens, key=lambda t: -t[0])
    by_score = sorted(tokens, key=lambda t: (-t[1], -t[0]))
    window_start = prompt_columns - config.snapkv_window
    if policy == "window":
        order = newest_first
    elif policy == "streaming":
        sinks = [t for t in tokens if t[0] < first_column + config.sinks]
        order = sorted(sinks, key=lambda t: -t[0]) + [t for t in newest_first if t not in sinks]
    elif policy == "h2o":
        recent = newest_first[: min(budget, max(1, math.floor(budget * config.recent_ratio)))]
        order = recent + [t for t in by_score if t not in recent]
    elif phase == "prefill":  # snapkv
        window = [t for t in newest_first if t[0] >= window_start]
        order = window + [t for t in by_score if t not in window]
    else:
        pinned = [t for t in newest_first if t[0] < window_start]
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
    config = SqueezeConfig(
        budget=0.5, policy=policy, sinks=sinks, recent_ratio=recent_ratio, snapkv_window=snapkv_window
    )
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
        data.draw(
            st.lists(st.integers(POLICIES[policy].min_tokens(config), 30), min_size=batch, max_size=batch)
        )
    )
    prompt_columns = int(positions.max()) + 1 - data.draw(st.integers(0, 5))

    first_column = torch.tensor(data.draw(st.lists(st.integers(0, 6), min_size=batch, max_size=batch)))
    view = LayerView(positions, valid, scores, phase, prompt_columns, first_column)
    priority = ranking(view, budget, config).expand(batch, heads, slots)
    chosen, kept = select(priority, valid, budget)

    for b in range(batch):
        for h in range(heads):
            tokens = [
                (int(positions[b, h, s]), float(scores[b, h, s])) for s in range(slots) if valid[b, h, s]
            ]
            expected = reference_keep(
                policy, tokens, int(budget[b]), config, phase, prompt_columns, int(first_column[b])
            )
            got = {
                int(positions[b, h, s])
                for s, k in zip(chosen[b, h].tolist(), kept[b, h].tolist(), strict=True)
                if k
            }
            assert got == expected
            assert chosen[b, h].tolist() == sorted(chosen[b, h].tolist())  # slots stay in position order

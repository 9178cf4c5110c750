"""D^3S: exact max-variance subsets (against brute force), token selection counts, the linear schedule."""

import itertools
import math
import random

import pytest
import torch
from align_cli.losses import d3s_schedule, max_variance_subset, select_samples, select_tokens
from align_cli.losses.d3s import kept_token_count


def variance(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


@pytest.mark.parametrize("seed", range(40))
def test_max_variance_subset_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    if seed % 4 == 0:  # ties and repeated values, as group advantages have
        values = [float(rng.choice([-1, 0, 0.5, 1])) for _ in range(n)]
    else:
        values = [rng.gauss(0, 1) for _ in range(n)]
    tensor = torch.tensor(values, dtype=torch.float64)
    for m in range(1, n + 1):
        chosen = max_variance_subset(tensor, m)
        assert chosen.dtype == torch.long and len(chosen) == m and len(set(chosen.tolist())) == m
        assert chosen.tolist() == sorted(chosen.tolist())
        best = max(variance([values[i] for i in subset]) for subset in itertools.combinations(range(n), m))
        assert math.isclose(variance([values[i] for i in chosen.tolist()]), best, rel_tol=1e-9, abs_tol=1e-12)


def test_max_variance_subset_edge_sizes():
    values = torch.tensor([3.0, -1.0, 2.0])
    assert max_variance_subset(values, 5).tolist() == [0, 1, 2]
    assert max_variance_subset(values, 0).tolist() == []
    assert max_variance_subset(values, 2).tolist() == [0, 1]  # the two extremes
    with pytest.raises(ValueError):
        max_variance_subset(values, -1)


def test_select_samples_within_groups_and_across_the_batch():
    advantages = torch.tensor([[1.0, -1.0, 0.1, 0.0], [0.5, 0.4, -0.2, 3.0]])
    within = select_samples(advantages, 2, "group")
    assert within.sum(dim=1).tolist() == [2, 2]
    assert within[0].tolist() == [True, True, False, False] and within[1].tolist() == [False, False, True, True]
    across = select_samples(advantages, 2, "batch")
    assert int(across.sum()) == 4
    flat = advantages.reshape(-1)
    best = max(variance([float(flat[i]) for i in s]) for s in itertools.combinations(range(8), 4))
    assert math.isclose(variance(flat[across.reshape(-1)].tolist()), best, rel_tol=1e-6)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("keep_percent", [1.0, 20.0, 30.0, 37.5, 50.0, 99.0, 100.0])
def test_token_selection_keeps_exactly_ceil_k_percent(scope, keep_percent):
    generator = torch.Generator().manual_seed(int(keep_percent * 10))
    lengths = torch.tensor([10, 3, 7, 1, 10])
    mask = torch.arange(10)[None] < lengths[:, None]
    advantages = torch.randn(5, generator=generator)
    entropy = torch.rand(5, 10, generator=generator)
    entropy[1, 0] = 0.0  # a zero score can still be needed to reach the count
    kept = select_tokens(advantages, entropy, mask, keep_percent, scope)
    assert not (kept & ~mask).any()
    if scope == "batch":
        assert int(kept.sum()) == math.ceil(int(mask.sum()) * keep_percent / 100 - 1e-9)
        # exactly the highest |A| * H among valid tokens
        scores = (advantages[:, None].abs() * entropy)[mask]
        threshold = scores.sort(descending=True).values[int(kept.sum()) - 1]
        assert ((advantages[:, None].abs() * entropy)[kept] >= threshold).all()
    else:
        for row, n in enumerate(lengths.tolist()):
            assert int(kept[row].sum()) == math.ceil(n * keep_percent / 100 - 1e-9)


def test_kept_count_rounds_before_ceiling():
    assert kept_token_count(10, 30.0) == 3  # 10 * 0.3 is 3.0000000000000004 in floating point
    assert kept_token_count(10, 31.0) == 4
    assert kept_token_count(0, 50.0) == 0


def test_token_selection_with_per_token_advantages():
    advantages = torch.tensor([[1.0, -5.0, 0.1], [2.0, 0.0, 0.0]])
    entropy = torch.tensor([[1.0, 1.0, 1.0], [1.0, 9.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kept = select_tokens(advantages, entropy, mask, 40.0)  # ceil(0.4 * 5) = 2 tokens: |-5|*1 and 2*1
    assert kept.tolist() == [[False, True, False], [True, False, False]]


def test_linear_schedule():
    assert d3s_schedule(0.0, 4, 8, 20.0, 60.0) == (4, 20.0)
    assert d3s_schedule(1.0, 4, 8, 20.0, 60.0) == (8, 60.0)
    assert d3s_schedule(0.5, 4, 8, 20.0, 60.0) == (6, 40.0)
    m, keep = d3s_schedule(0.375, 4, 8, 20.0, 60.0)  # m = 5.5 rounds half up
    assert m == 6 and math.isclose(keep, 35.0)
    assert d3s_schedule(2.0, 4, 8, 20.0, 60.0) == (8, 60.0)  # progress clamped


def test_default_scope_is_the_papers_cross_group_selection():
    """The paper's D3S selects "across groups" (abstract); D3S-I (within each group) is its variant."""
    from align_cli.config import D3SConfig
    from align_cli.recipe import load_recipe

    assert D3SConfig().sample_scope == "batch"
    recipe, _ = load_recipe("d3s")
    assert recipe.method.rl.d3s.sample_scope == "batch"
    assert D3SConfig(sample_scope="group").sample_scope == "group"

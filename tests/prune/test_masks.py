"""Properties of the pure mask math in :mod:`slimkit.prune.masks`."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimkit.prune.masks import (
    global_masks,
    layer_mask,
    mask_sparsity,
    nm_mask,
    prune_count,
    view_2d,
)

FAST = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

sparsities = st.floats(0.0, 0.999, allow_nan=False, exclude_max=False)
seeds = st.integers(0, 2**31 - 1)


def random_scores(shape, seed: int, *, ties: bool = False) -> torch.Tensor:
    """Non-negative scores; with ``ties`` many values repeat (a coarse grid)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(shape, generator=gen, dtype=torch.float64)
    if ties:
        scores = torch.floor(scores * 4) / 4
    return scores.float()


def zeros(mask: torch.Tensor) -> int:
    return int((mask == 0).sum())


def block_view(mask_2d: torch.Tensor, block) -> list[torch.Tensor]:
    """Every block of a 2-D tensor (ragged edge blocks are smaller)."""
    rows, cols = mask_2d.shape
    br, bc = block
    return [mask_2d[r : r + br, c : c + bc] for r in range(0, rows, br) for c in range(0, cols, bc)]


# --- prune_count / mask_sparsity ----------------------------------------------------------------


def test_prune_count_rounds_half_up_and_never_prunes_a_whole_tensor():
    assert prune_count(10, 0.0) == 0
    assert prune_count(10, 0.24) == 2
    assert prune_count(10, 0.25) == 3  # 2.5 rounds up
    assert prune_count(10, 0.5) == 5
    assert prune_count(1000, 0.9) == 900
    # a sparsity below 1 never removes every element, even when rounding would
    assert prune_count(1, 0.5) == 0
    assert prune_count(3, 0.9) == 2
    assert prune_count(1000, 0.9999) == 999
    assert prune_count(0, 0.5) == 0


@FAST
@given(numel=st.integers(0, 5000), sparsity=sparsities)
def test_prune_count_is_within_half_an_element_unless_capped(numel, sparsity):
    count = prune_count(numel, sparsity)
    assert 0 <= count <= max(numel - 1, 0)
    if count < numel - 1:
        assert abs(count - sparsity * numel) <= 0.5 + 1e-9


def test_mask_sparsity_counts_zeros():
    assert mask_sparsity(torch.ones(4, 5)) == 0.0
    assert mask_sparsity(torch.zeros(3)) == 1.0
    assert mask_sparsity(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])) == pytest.approx(0.6)
    assert mask_sparsity(torch.empty(0)) == 0.0


# --- unstructured -------------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


@FAST
@given(shape=shapes, sparsity=sparsities, seed=seeds, ties=st.booleans())
def test_layer_mask_prunes_exact_count_of_smallest_scores(shape, sparsity, seed, ties):
    scores = random_scores(shape, seed, ties=ties)
    mask = layer_mask(scores, torch.ones(shape), sparsity)
    assert mask.shape == scores.shape and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert zeros(mask) == prune_count(scores.numel(), sparsity)
    pruned, kept = scores[mask == 0], scores[mask == 1]
    if pruned.numel() and kept.numel():
        assert pruned.max() <= kept.min()


def test_layer_mask_picks_the_smallest_and_breaks_ties_by_position():
    scores = torch.tensor([[0.5, 0.1, 0.9], [0.1, 0.7, 0.3]])
    mask = layer_mask(scores, torch.ones(2, 3), 0.5)
    assert torch.equal(mask, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    # ties: the earlier element goes first (stable order)
    mask = layer_mask(torch.zeros(2, 2), torch.ones(2, 2), 0.25)
    assert torch.equal(mask, torch.tensor([[0.0, 1.0], [1.0, 1.0]]))


@FAST
@given(
    shape=shapes,
    first=sparsities,
    second=sparsities,
    seed=seeds,
    rescore=st.booleans(),
    ties=st.booleans(),
)
def test_layer_mask_is_monotone(shape, first, second, seed, rescore, ties):
    """Earlier zeros stay zero, also when the scores change between the calls."""
    scores = random_scores(shape, seed, ties=ties)
    mask1 = layer_mask(scores, torch.ones(shape), first)
    # new scores may rank a pruned element first: it still stays pruned
    scores2 = random_scores(shape, seed + 1, ties=ties) if rescore else scores
    mask2 = layer_mask(scores2, mask1, second)
    assert bool(((mask1 == 0) <= (mask2 == 0)).all())
    numel = scores.numel()
    assert zeros(mask2) == max(prune_count(numel, second), zeros(mask1))


def test_layer_mask_keeps_pruned_weights_whose_scores_grew():
    scores = torch.arange(1.0, 11.0)
    mask1 = layer_mask(scores, torch.ones(10), 0.5)  # prunes 1..5
    assert torch.equal(mask1, torch.tensor([0.0] * 5 + [1.0] * 5))
    regrown = scores.flip(0)  # the pruned ones now score highest
    mask2 = layer_mask(regrown, mask1, 0.7)
    # old zeros stay, plus the two lowest of the still-kept (positions 9, 8 -> scores 1, 2)
    assert torch.equal(mask2, torch.tensor([0.0] * 5 + [1.0] * 3 + [0.0] * 2))


# --- blocks -------------------------------------------------------------------------------------


def check_blocks(scores, mask, block, sparsity):
    """Every block all-kept or all-pruned; greedy count rule; lowest-mean blocks pruned."""
    mask_2d, scores_2d = view_2d(mask), view_2d(scores).double()
    mask_blocks = block_view(mask_2d, block)
    score_blocks = block_view(scores_2d, block)
    for b in mask_blocks:
        assert bool((b == b[0, 0]).all()), "a block is partly pruned"
    target = prune_count(mask.numel(), sparsity)
    pruned = zeros(mask)
    assert pruned <= target
    means = [float(s.mean()) for s in score_blocks]
    pruned_means = [m for m, b in zip(means, mask_blocks, strict=True) if b[0, 0] == 0]
    kept = [(m, b.numel()) for m, b in zip(means, mask_blocks, strict=True) if b[0, 0] == 1]
    if pruned_means and kept:
        assert max(pruned_means) <= min(m for m, _ in kept)
    if kept and pruned < target:
        # the rule: prune blocks lowest mean first while the pruned element count stays
        # <= target; it stops at the first block that would overshoot (no skipping ahead)
        lowest_kept_size = min(kept, key=lambda item: item[0])[1]
        assert pruned + lowest_kept_size > target


@FAST
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    block=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    sparsity=sparsities,
    seed=seeds,
)
def test_block_mask_prunes_whole_blocks_including_ragged_edges(rows, cols, block, sparsity, seed):
    scores = random_scores((rows, cols), seed)
    mask = layer_mask(scores, torch.ones(rows, cols), sparsity, block)
    check_blocks(scores, mask, block, sparsity)


def test_ragged_blocks_on_a_10x7_weight_with_4x4_blocks():
    """Blocks tile (10, 7) as rows 0-3, 4-7, 8-9 x cols 0-3, 4-6: sizes 16, 12, 16, 12, 8, 6.

    Each block scores the mean of the elements it has, and counts its real size. At sparsity
    0.5 the target is 35 elements: the three lowest blocks (12 + 8 + 6 = 26) fit; the next
    (16) would overshoot, so the greedy rule stops at 26.
    """
    scores = torch.ones(10, 7)
    scores[0:4, 4:7] = 0.1  # block (0, 1): 12 elements
    scores[8:10, 0:4] = 0.2  # block (2, 0): 8 elements
    scores[8:10, 4:7] = 0.3  # block (2, 1): 6 elements
    scores[4:8, 0:4] = 0.4  # block (1, 0): 16 elements, would overshoot
    mask = layer_mask(scores, torch.ones(10, 7), 0.5, (4, 4))
    expected = torch.ones(10, 7)
    expected[0:4, 4:7] = 0
    expected[8:10, :] = 0
    assert torch.equal(mask, expected)
    assert zeros(mask) == 26 <= prune_count(70, 0.5)
    check_blocks(scores, mask, (4, 4), 0.5)
    # a ragged block is scored by the mean of its real elements, not diluted by padding
    scores = torch.ones(10, 7)
    scores[8:10, 4:7] = 0.9  # 6 real elements of mean 0.9 (a zero-padded mean would be 0.34)
    scores[0:4, 0:4] = 0.8  # 16 elements
    mask = layer_mask(scores, torch.ones(10, 7), 0.29, (4, 4))  # target 20
    expected = torch.ones(10, 7)
    expected[0:4, 0:4] = 0
    assert torch.equal(mask, expected)


def test_blocks_on_a_conv_weight_tile_the_out_by_in_times_kernel_view():
    scores = random_scores((6, 4, 3, 3), 3)
    mask = layer_mask(scores, torch.ones(6, 4, 3, 3), 0.4, (2, 8))  # view (6, 36): ragged cols
    assert mask.shape == (6, 4, 3, 3)
    check_blocks(scores, mask, (2, 8), 0.4)


@FAST
@given(
    rows=st.integers(1, 10),
    cols=st.integers(1, 10),
    block=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    first=sparsities,
    second=sparsities,
    seed=seeds,
)
def test_block_masks_are_monotone(rows, cols, block, first, second, seed):
    mask1 = layer_mask(random_scores((rows, cols), seed), torch.ones(rows, cols), first, block)
    scores2 = random_scores((rows, cols), seed + 7)
    mask2 = layer_mask(scores2, mask1, second, block)
    assert bool(((mask1 == 0) <= (mask2 == 0)).all())
    for b in block_view(mask2, block):
        assert bool((b == b[0, 0]).all())


# --- N:M ----------------------------------------------------------------------------------------

nm_pairs = st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)])


def groups_of(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """(rows, groups, m) along the input dim; a conv weight is read at each kernel position."""
    if tensor.dim() > 2:
        tensor = tensor.permute(0, *range(2, tensor.dim()), 1)  # (out, *kernel, in)
    flat = tensor.reshape(-1, tensor.shape[-1])
    return flat.reshape(flat.shape[0], -1, m)


@FAST
@given(
    nm=nm_pairs,
    out=st.integers(1, 6),
    n_groups=st.integers(1, 3),
    kernel=st.sampled_from([(), (3,), (2, 3), (1, 2, 2)]),
    seed=seeds,
)
def test_nm_mask_at_full_sparsity_keeps_exactly_n_largest_per_group(
    nm, out, n_groups, kernel, seed
):
    n, m = nm
    shape = (out, n_groups * m, *kernel)
    scores = random_scores(shape, seed)
    mask = nm_mask(scores, torch.ones(shape), n, m, (m - n) / m)
    assert mask.shape == scores.shape
    kept = groups_of(mask, m)
    assert bool((kept.sum(-1) == n).all())
    # the kept ones are the n largest in their group
    group_scores = groups_of(scores, m)
    kept_min = torch.where(kept == 1, group_scores, torch.inf).amin(-1)
    pruned_max = torch.where(kept == 0, group_scores, -torch.inf).amax(-1)
    assert bool((pruned_max <= kept_min).all())


def test_nm_groups_run_along_in_channels_at_each_kernel_position():
    """A Conv2d weight's mask equals the mask of its (out*kh*kw, in) permuted view."""
    weight = torch.nn.Conv2d(8, 3, (2, 3)).weight.detach()
    scores = weight.abs()
    mask = nm_mask(scores, torch.ones_like(weight), 2, 4, 0.5)
    permuted = scores.permute(0, 2, 3, 1).reshape(-1, 8)
    mask_2d = nm_mask(permuted, torch.ones_like(permuted), 2, 4, 0.5)
    assert torch.equal(mask.permute(0, 2, 3, 1).reshape(-1, 8), mask_2d)
    for o in range(3):
        for i in range(2):
            for j in range(3):
                column = mask[o, :, i, j]  # the 8 input channels at one kernel position
                assert column[:4].sum() == 2 and column[4:].sum() == 2
                top = torch.topk(scores[o, :4, i, j], 2).indices
                assert bool((column[:4][top] == 1).all())


@FAST
@given(nm=nm_pairs, sparsity=sparsities, rows=st.integers(1, 5), seed=seeds)
def test_nm_mask_keeps_at_least_n_and_prunes_rounded_share_when_gradual(nm, sparsity, rows, seed):
    n, m = nm
    shape = (rows, 2 * m)
    mask = nm_mask(random_scores(shape, seed), torch.ones(shape), n, m, sparsity)
    pruned = m - groups_of(mask, m).sum(-1)
    expected = min(m - n, math.floor(sparsity * m + 0.5))  # round(s * m), half up
    assert bool((pruned == expected).all())
    assert bool((m - pruned >= n).all())


@FAST
@given(nm=nm_pairs, first=sparsities, second=sparsities, seed=seeds)
def test_nm_mask_is_monotone(nm, first, second, seed):
    n, m = nm
    shape = (4, 2 * m, 3)
    mask1 = nm_mask(random_scores(shape, seed), torch.ones(shape), n, m, first)
    mask2 = nm_mask(random_scores(shape, seed + 1), mask1, n, m, second)
    assert bool(((mask1 == 0) <= (mask2 == 0)).all())
    assert bool((groups_of(mask2, m).sum(-1) >= n).all())


def test_nm_mask_gradual_steps_toward_2_4():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.6, 0.7, 0.8]])
    ones = torch.ones_like(scores)
    assert torch.equal(nm_mask(scores, ones, 2, 4, 0.1), ones)  # round(0.4) = 0
    quarter = nm_mask(scores, ones, 2, 4, 0.25)  # one per group
    assert torch.equal(quarter, torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]]))
    half = nm_mask(scores, quarter, 2, 4, 0.5)
    assert torch.equal(half, torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]]))
    # beyond (m - n) / m the pattern never prunes more than m - n per group
    assert torch.equal(nm_mask(scores, half, 2, 4, 0.9), half)


# --- global ranking -----------------------------------------------------------------------------


@st.composite
def layer_sets(draw):
    count = draw(st.integers(1, 3))
    layers = []
    for _ in range(count):
        shape = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple))
        scale = draw(st.sampled_from([1e-4, 0.1, 1.0, 10.0]))
        layers.append((shape, scale))
    return layers


@FAST
@given(layers=layer_sets(), sparsity=sparsities, cap=st.floats(0.05, 0.99), seed=seeds)
def test_global_masks_count_cap_and_threshold(layers, sparsity, cap, seed):
    scores = [random_scores(shape, seed + i) * scale for i, (shape, scale) in enumerate(layers)]
    masks = [torch.ones(shape) for shape, _ in layers]
    new, threshold = global_masks(scores, masks, sparsity, cap)
    total = sum(s.numel() for s in scores)
    max_per_layer = [min(s.numel() - 1, math.floor(cap * s.numel() + 1e-9)) for s in scores]
    for mask, limit in zip(new, max_per_layer, strict=True):
        assert zeros(mask) <= limit
    pruned_total = sum(zeros(m) for m in new)
    assert pruned_total == min(prune_count(total, sparsity), sum(max_per_layer))
    pruned_scores = torch.cat([s[m == 0] for s, m in zip(scores, new, strict=True)])
    if pruned_total:
        assert threshold == pytest.approx(float(pruned_scores.double().max()), rel=0, abs=0)
    else:
        assert math.isnan(threshold)
    # one threshold: every kept score of a layer that did not hit its cap is >= it
    for s, m, limit in zip(scores, new, max_per_layer, strict=True):
        if pruned_total and zeros(m) < limit and bool((m == 1).any()):
            assert float(s[m == 1].min()) >= threshold


def test_global_masks_respect_the_per_layer_cap_for_a_tiny_layer():
    gen = torch.Generator().manual_seed(0)
    big = torch.rand(100, generator=gen) + 1.0
    tiny = torch.rand(100, generator=gen) * 1e-3
    for cap, expected_tiny in [(0.8, 80), (0.98, 98), (0.5, 50)]:
        (big_mask, tiny_mask), threshold = global_masks(
            [big, tiny], [torch.ones(100), torch.ones(100)], 0.5, cap
        )
        # unconstrained, all 100 pruned weights would come from the tiny layer
        assert zeros(tiny_mask) == expected_tiny, cap
        assert zeros(big_mask) == 100 - expected_tiny
        # the kept tiny weights are its largest ones
        assert float(tiny[tiny_mask == 0].max()) <= float(tiny[tiny_mask == 1].min())
        assert threshold == float(big[big_mask == 0].max())


def test_global_masks_threshold_is_the_largest_newly_pruned_score_and_keeps_old_zeros():
    a = torch.tensor([0.1, 0.2, 0.3, 0.4])
    b = torch.tensor([5.0, 0.15, 0.25, 6.0])
    masks, threshold = global_masks([a, b], [torch.ones(4), torch.ones(4)], 0.25, 0.9)
    assert torch.equal(masks[0], torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert torch.equal(masks[1], torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert threshold == pytest.approx(0.15)
    # next round: b's pruned weight now scores high; it stays pruned and does not set the threshold
    b2 = torch.tensor([5.0, 9.0, 0.25, 6.0])
    masks2, threshold2 = global_masks([a, b2], masks, 0.5, 0.9)
    assert torch.equal(masks2[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.equal(masks2[1], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert threshold2 == pytest.approx(0.25)


def test_global_masks_with_blocks_prune_whole_blocks():
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(8, 8, generator=gen), torch.rand(6, 10, generator=gen) * 0.5]
    masks, _ = global_masks(scores, [torch.ones(8, 8), torch.ones(6, 10)], 0.5, 0.9, (2, 4))
    for mask in masks:
        for b in block_view(mask, (2, 4)):
            assert bool((b == b[0, 0]).all())
    assert sum(zeros(m) for m in masks) <= prune_count(124, 0.5)

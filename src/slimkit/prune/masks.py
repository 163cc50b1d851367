"""Pure mask math for magnitude pruning: scores in, keep-masks out.

Every pattern reduces to one primitive, :func:`prune_units`: given a score and a size (element
count) per *unit* — a weight, a block, or a weight inside an N:M group — prune the lowest-scoring
units until the pruned element count reaches a target. Masks are monotone: units pruned before
stay pruned (they sort first), so sparsity never goes down.

Weight views:

* blocks tile the 2-D view ``(out, in * prod(kernel))``; when a block shape does not divide that
  view, the last row/column of blocks is *ragged* (smaller), is scored by the mean of the elements
  it has, and counts its real size toward the sparsity;
* N:M groups run along the input-channel dimension: a conv weight ``(out, in, *k)`` is viewed as
  ``(out * prod(k), in)`` so each group holds ``m`` consecutive input channels at one kernel
  position (NVIDIA ASP's layout). ``in`` must be divisible by ``m``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def prune_count(numel: int, sparsity: float) -> int:
    """Number of elements to prune for ``sparsity`` (round half up, never all of them)."""
    count = math.floor(sparsity * numel + 0.5)
    return min(max(count, 0), max(numel - 1, 0))


def prune_units(
    scores: Tensor, sizes: Tensor, target: int, already: Tensor, keep: Tensor | None = None
) -> Tensor:
    """Return a bool tensor (True = pruned) over 1-D ``scores``.

    Prunes every ``already`` unit, then the lowest-scoring others (stable order on ties) while the
    total pruned size stays <= ``max(target, size of already pruned)``. Units flagged in ``keep``
    are never pruned (used for the per-layer cap of global ranking).
    """
    order_scores = scores.double().clone()
    order_scores[already] = -math.inf
    if keep is not None:
        order_scores[keep & ~already] = math.inf
    order = torch.argsort(order_scores, stable=True)
    cumulative = torch.cumsum(sizes[order].double(), 0)
    already_size = float(sizes[already].sum())
    limit = max(float(target), already_size)
    bound = torch.tensor(limit, dtype=torch.float64, device=cumulative.device)
    n_prune = int(torch.searchsorted(cumulative, bound, right=True))
    n_prune = max(n_prune, int(already.sum()))
    if keep is not None:
        n_prune = min(n_prune, int((~keep | already).sum()))
    pruned = torch.zeros_like(already)
    pruned[order[:n_prune]] = True
    return pruned


# --- views ------------------------------------------------------------------------------------


def view_2d(weight: Tensor) -> Tensor:
    """``(out, rest)`` view of a Linear/Conv weight."""
    return weight.reshape(weight.shape[0], -1)


def nm_view(weight: Tensor) -> Tensor:
    """``(out * prod(kernel), in)`` view: rows are (output, kernel position), columns inputs."""
    if weight.dim() == 2:
        return weight
    return weight.movedim(1, -1).reshape(-1, weight.shape[1])


def from_nm_view(view: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`nm_view` for a weight of ``shape``."""
    if len(shape) == 2:
        return view.reshape(shape)
    out, inp, *kernel = shape
    return view.reshape(out, *kernel, inp).movedim(-1, 1)


def block_grid(shape_2d: Sequence[int], block: Sequence[int]) -> tuple[int, int]:
    """Number of blocks along each dimension (ragged edge blocks included)."""
    return math.ceil(shape_2d[0] / block[0]), math.ceil(shape_2d[1] / block[1])


def block_reduce(values_2d: Tensor, block: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per-block (mean of values, element count) over a 2-D tensor; ragged edges allowed."""
    rows, cols = values_2d.shape
    br, bc = block
    gr, gc = block_grid((rows, cols), block)
    padded = torch.zeros(gr * br, gc * bc, dtype=torch.float64)
    padded[:rows, :cols] = values_2d.double()
    ones = torch.zeros_like(padded)
    ones[:rows, :cols] = 1.0
    sums = padded.reshape(gr, br, gc, bc).sum(dim=(1, 3))
    counts = ones.reshape(gr, br, gc, bc).sum(dim=(1, 3))
    return sums / counts, counts


def block_expand(block_values: Tensor, block: Sequence[int], shape_2d: Sequence[int]) -> Tensor:
    """Broadcast one value per block back onto the 2-D view (cropping ragged edges)."""
    expanded = block_values.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return expanded[: shape_2d[0], : shape_2d[1]]


# --- units per pattern ------------------------------------------------------------------------


def unit_scores(scores: Tensor, mask: Tensor, block: Sequence[int] | None) -> tuple[Tensor, ...]:
    """Flatten a layer into units: (scores, sizes, already-pruned) for unstructured or blocks."""
    if block is None:
        flat = scores.reshape(-1)
        return flat, torch.ones_like(flat, dtype=torch.float64), mask.reshape(-1) == 0
    block_score, sizes = block_reduce(view_2d(scores), block)
    kept, _ = block_reduce(view_2d(mask), block)
    return block_score.reshape(-1), sizes.reshape(-1), kept.reshape(-1) == 0


def units_to_mask(
    pruned: Tensor, shape: Sequence[int], block: Sequence[int] | None, dtype: torch.dtype
) -> Tensor:
    """Turn pruned units back into a keep-mask of the weight's ``shape`` and ``dtype``."""
    if block is None:
        return (~pruned).reshape(shape).to(dtype)
    rows = shape[0]
    cols = math.prod(shape[1:])
    grid = block_grid((rows, cols), block)
    keep_blocks = (~pruned).reshape(grid).to(torch.float64)
    return block_expand(keep_blocks, block, (rows, cols)).reshape(shape).to(dtype)


def layer_mask(
    scores: Tensor, mask: Tensor, sparsity: float, block: Sequence[int] | None = None
) -> Tensor:
    """Local ranking for one layer: the new keep-mask at ``sparsity`` (unstructured or blocks)."""
    flat_scores, sizes, already = unit_scores(scores, mask, block)
    target = prune_count(mask.numel(), sparsity)
    pruned = prune_units(flat_scores, sizes, target, already)
    return units_to_mask(pruned, mask.shape, block, mask.dtype)


def nm_mask(scores: Tensor, mask: Tensor, n: int, m: int, sparsity: float) -> Tensor:
    """N:M keep-mask: in each group of ``m`` inputs prune up to ``m - n`` lowest scores.

    At ``sparsity`` below ``(m - n) / m`` (a gradual schedule) each group prunes
    ``round(sparsity * m)`` elements, so the pattern tightens toward N:M step by step.
    """
    per_group = min(m - n, math.floor(sparsity * m + 0.5))
    view = nm_view(scores).double()
    keep_view = nm_view(mask)
    rows, cols = view.shape
    groups = view.reshape(rows, cols // m, m).clone()
    already = keep_view.reshape(rows, cols // m, m) == 0
    groups[already] = -math.inf
    order = torch.argsort(groups, dim=-1, stable=True)
    ranks = torch.argsort(order, dim=-1)
    count = torch.maximum(already.sum(-1, keepdim=True), torch.tensor(per_group))
    pruned = ranks < count
    keep = (~pruned).reshape(rows, cols).to(mask.dtype)
    return from_nm_view(keep, mask.shape)


def global_masks(
    scores: Sequence[Tensor],
    masks: Sequence[Tensor],
    sparsity: float,
    max_layer_sparsity: float,
    block: Sequence[int] | None = None,
) -> tuple[list[Tensor], float]:
    """One threshold across layers with a per-layer cap; returns (keep-masks, threshold).

    Each layer keeps at least its ``ceil((1 - max_layer_sparsity) * units)`` best units, so no layer
    is pruned away entirely. The threshold is the highest score among newly pruned units.
    """
    per_layer = [unit_scores(s, m, block) for s, m in zip(scores, masks, strict=True)]
    keeps = []
    for flat, _, already in per_layer:
        # round first: (1 - 0.98) * 100 is 2.0000000000000018 in floats, and ceil would keep 3
        n_keep = max(1, math.ceil(round((1.0 - max_layer_sparsity) * flat.numel(), 9)))
        ranked = flat.double().clone()
        ranked[already] = -math.inf
        top = torch.topk(ranked, min(n_keep, flat.numel())).indices
        keep = torch.zeros_like(already)
        keep[top] = True
        keeps.append(keep & ~already)
    all_scores = torch.cat([p[0].double() for p in per_layer])
    all_sizes = torch.cat([p[1] for p in per_layer])
    all_already = torch.cat([p[2] for p in per_layer])
    total = sum(m.numel() for m in masks)
    pruned = prune_units(
        all_scores, all_sizes, prune_count(total, sparsity), all_already, torch.cat(keeps)
    )
    newly = pruned & ~all_already
    threshold = float(all_scores[newly].max()) if bool(newly.any()) else float("nan")
    out, start = [], 0
    for (flat, _, _), mask in zip(per_layer, masks, strict=True):
        part = pruned[start : start + flat.numel()]
        out.append(units_to_mask(part, mask.shape, block, mask.dtype))
        start += flat.numel()
    return out, threshold


def mask_sparsity(mask: Tensor) -> float:
    """Fraction of zeros in a keep-mask."""
    return 0.0 if mask.numel() == 0 else float((mask == 0).sum()) / mask.numel()

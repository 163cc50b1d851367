"""Multiply-accumulates (MACs) and parameters, per layer and in total, per sample.

Two counts from one forward pass:

* ``layers`` — forward hooks on convolutions, linear layers, norms and ``nn.MultiheadAttention``
  give per-module MACs. A convolution costs ``Cin/groups * prod(kernel)`` MACs per output element,
  so a depthwise conv (``groups == Cin``) costs ``prod(kernel)`` per output element. A linear layer
  costs ``in_features`` per output element, counting every leading dim (tokens). Norms cost no MACs;
  their input elements are reported as ``norm_ops``. Other modules with their own parameters
  (embeddings, ...) are listed with 0 MACs.
* ``total_macs`` — ``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2, which also sees matmuls
  done outside parameterised modules, notably attention: ``Q @ K^T`` and ``attn @ V`` cost
  ``T * T * D`` MACs each for T tokens of width D (all heads together), including
  ``F.scaled_dot_product_attention`` on CPU. ``other_macs`` is what the hooks did not see.
  PyTorch's fused MHA / encoder-layer fast path is switched off during the pass so that
  ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` are counted too.

Every count is divided by the batch size (axis 0 of the first input tensor).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from slimkit.errors import ConfigError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_KNOWN = (*_CONV, *_CONV_T, nn.Linear, nn.MultiheadAttention, *_NORM)


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """One module's per-sample cost: ``macs`` (0 for norms) and ``norm_ops`` (norm elements)."""

    name: str
    type: str
    macs: int
    params: int
    norm_ops: int = 0


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """Per-sample MACs and parameter counts of one model (see the module docstring)."""

    total_macs: int
    params: int
    batch_size: int
    layers: tuple[LayerFlops, ...]

    @property
    def layer_macs(self) -> dict[str, int]:
        """MACs of each hooked module, by qualified name."""
        return {row.name: row.macs for row in self.layers}

    @property
    def hooked_macs(self) -> int:
        return sum(row.macs for row in self.layers)

    @property
    def other_macs(self) -> int:
        """MACs outside the hooked modules (attention matmuls, functional ops); never negative."""
        return max(self.total_macs - self.hooked_macs, 0)

    @property
    def norm_ops(self) -> int:
        return sum(row.norm_ops for row in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_macs": self.total_macs,
            "hooked_macs": self.hooked_macs,
            "other_macs": self.other_macs,
            "norm_ops": self.norm_ops,
            "params": self.params,
            "batch_size": self.batch_size,
            "layers": [dataclasses.asdict(row) for row in self.layers],
        }

    def __str__(self) -> str:
        rows = [(r.name or "(model)", r.type, f"{r.macs:,}", f"{r.params:,}") for r in self.layers]
        rows.append(("(outside hooked layers)", "", f"{self.other_macs:,}", ""))
        rows.append(("total", "", f"{self.total_macs:,}", f"{self.params:,}"))
        header = ("layer", "type", "MACs/sample", "params")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

        def line(row: tuple[str, ...]) -> str:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [row[2].rjust(widths[2]), row[3].rjust(widths[3])]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * w for w in widths)
        body = [line(header), rule, *map(line, rows[:-2]), rule, *map(line, rows[-2:])]
        return "\n".join(body)


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _mha_macs(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> int:
    query = kwargs.get("query", args[0] if args else None)
    key = kwargs.get("key", args[1] if len(args) > 1 else query)
    if query.dim() == 2:  # unbatched (L, E)
        batch, q_len, k_len = 1, query.shape[0], key.shape[0]
    elif module.batch_first:
        batch, q_len, k_len = query.shape[0], query.shape[1], key.shape[1]
    else:
        batch, q_len, k_len = query.shape[1], query.shape[0], key.shape[0]
    e = module.embed_dim
    projections = q_len * e * e + k_len * e * (module.kdim + module.vdim) + q_len * e * e
    return batch * (projections + 2 * q_len * k_len * e)


def _module_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple[int, int]:
    """Total (not per-sample) ``(macs, norm_ops)`` of one call."""
    if isinstance(module, _CONV):
        per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
        return _first_tensor(output).numel() * per_out, 0
    if isinstance(module, _CONV_T):
        per_in = module.out_channels // module.groups * math.prod(module.kernel_size)
        return _first_tensor(args).numel() * per_in, 0
    if isinstance(module, nn.Linear):
        return _first_tensor(output).numel() * module.in_features, 0
    if isinstance(module, nn.MultiheadAttention):
        return _mha_macs(module, args, kwargs), 0
    if isinstance(module, _NORM):
        return 0, _first_tensor(args).numel()
    return 0, 0


def _cpu_sdpa_flops(query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernel behind SDPA."""
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_macs(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    *,
    batch_size: int | None = None,
) -> FlopsReport:
    """Per-sample MACs of one eval-mode forward pass on ``example_inputs``.

    ``batch_size`` defaults to axis 0 of the first input tensor. Training flags are restored.
    """
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if batch_size is None:
        first = _first_tensor(args)
        batch_size = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")

    totals: dict[str, list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if ".parametrizations." in f".{name}.":
            continue  # a parametrised weight is counted with the module that owns it
        if not isinstance(module, _KNOWN) and not any(True for _ in module.parameters(False)):
            continue

        def hook(mod: nn.Module, a: tuple, kw: dict, out: Any, name: str = name) -> None:
            macs, norm = _module_macs(mod, a, kw, out)
            entry = totals.setdefault(name, [0, 0])
            entry[0] += macs
            entry[1] += norm

        handles.append(module.register_forward_hook(hook, with_kwargs=True))

    modes = {module: module.training for module in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    try:
        # The fused MHA / encoder-layer kernels hide their matmuls from both hooks and counter.
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), _flop_counter() as counter:
            model(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

    layers = []
    for name, module in model.named_modules():  # rows in definition order
        if name not in totals:
            continue
        macs, norm = totals[name]
        recurse = isinstance(module, _KNOWN)
        params = sum(p.numel() for p in module.parameters(recurse=recurse))
        layers.append(
            LayerFlops(
                name=name,
                type=type(module).__name__,
                macs=round(macs / batch_size),
                params=params,
                norm_ops=round(norm / batch_size),
            )
        )
    return FlopsReport(
        total_macs=round(counter.get_total_flops() / 2 / batch_size),
        params=count_params(model),
        batch_size=batch_size,
        layers=tuple(layers),
    )


__all__ = ["FlopsReport", "LayerFlops", "count_macs", "count_params"]

"""Shared benchmark plumbing: results JSON and the markdown table in benchmarks/README.md."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from slimkit.io import atomic_write_json, atomic_write_text
from slimkit.measure.latency import cpu_info

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
README = ROOT / "README.md"


def environment() -> dict[str, Any]:
    """What the numbers were measured on (CPU ISA flags matter for int8 kernels)."""
    import torch

    return {
        "cpu": cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME.json`` atomically."""
    return atomic_write_json(RESULTS / f"{name}.json", payload)


def update_readme_section(name: str, markdown: str) -> None:
    """Replace the block between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in the README."""
    text = README.read_text(encoding="utf-8") if README.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    atomic_write_text(README, text)


def md_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def train(
    model: Any,
    task: Any,
    epochs: int,
    lr: float,
    seed: int,
    *,
    compressor: Any = None,
    loader: Any = None,
    on_step: Any = None,
) -> None:
    """The benchmarks' one training loop: Adam over the model's (and the compressor's own)
    parameters, cosine decay over the whole budget, epoch ``e`` ordered by seed ``seed*100+e``.

    ``loader(seed)`` defaults to ``task.train_loader``; the loss is the task loss (scaled by the
    compressor's ``task_loss_weight``) plus ``compressor.loss``; after every optimizer step the
    compressor steps, then ``on_step(step)`` runs.
    """
    import torch

    loader = loader or task.train_loader
    params = [p for p in model.parameters() if p.requires_grad]
    if compressor is not None:
        params += [p for p in compressor.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader(0))))
    weight = compressor.task_loss_weight if compressor is not None else 1.0
    step = 0
    for epoch in range(epochs):
        model.train()
        for batch in loader(seed * 100 + epoch):
            outputs = task.forward(model, batch)
            loss = task.loss(outputs, batch)
            if weight != 1.0:
                loss = weight * loss
            if compressor is not None:
                loss = loss + compressor.loss(outputs, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            decay.step()
            step += 1
            if compressor is not None:
                compressor.step()
            if on_step is not None:
                on_step(step)

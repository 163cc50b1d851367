"""Compress a small CNN on scikit-learn's digits with PyTorch Lightning: gradual magnitude
pruning to 70% plus LSQ quantization-aware training, driven by ``CompressionCallback``.

    python examples/lightning_example.py        # about 10-20 s on one CPU core

Under DDP (CPU, gloo) start it with torchrun; Lightning detects the torchelastic environment and
uses its own ``strategy="ddp"`` with one device per process::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/lightning_example.py

(``python examples/lightning_example.py --devices 2`` lets Lightning start the processes itself.)
The global batch stays 64 rows (32 per rank with two), so the steps and the pruning schedule are
the ones of one process. The callback applies the techniques in ``setup``, before the strategy
wraps the module in ``DistributedDataParallel``; the masks are decided on rank 0 and broadcast,
QAT's initial ranges are all-reduced, and DDP keeps weights and LSQ scales in sync. Only rank 0
prints.

``--epochs N`` shortens the run; ``--out DIR`` makes every rank write ``DIR/rank{R}.pt`` (the
compressed network's ``state_dict`` with its masks and quantizer scales, plus the sparsity and
accuracy) so the ranks can be compared; ``--no-shuffle`` keeps the data order fixed (the same
global batches on any number of processes).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from slimkit import distributed
from slimkit.integrations.lightning import CompressionCallback
from slimkit.prune import MagnitudePruningConfig
from slimkit.quant import QATConfig

EPOCHS = 8
GLOBAL_BATCH = 64  # rows per optimizer step, over every process
TRAIN_ROWS = 1400


def digits() -> tuple[TensorDataset, TensorDataset]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return TensorDataset(x[:TRAIN_ROWS], y[:TRAIN_ROWS]), TensorDataset(
        x[TRAIN_ROWS:], y[TRAIN_ROWS:]
    )


class Lit(pl.LightningModule):
    def __init__(self, slimkit: CompressionCallback, train: TensorDataset, shuffle: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
        self.slimkit = slimkit
        self.train_data, self.shuffle = train, shuffle

    def train_dataloader(self) -> DataLoader:
        # each process takes its share of every global batch: rank r gets rows r, r + world, ...
        # (Lightning would add a shuffling DistributedSampler itself; this one keeps --no-shuffle)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.train_data, world, rank, shuffle=self.shuffle, seed=0)
        return DataLoader(self.train_data, batch_size=GLOBAL_BATCH // world, sampler=sampler)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        return self.slimkit.training_loss(F.cross_entropy(logits, y), logits, batch)

    def configure_optimizers(self):  # runs after the callback applied QAT: sees its scales
        return torch.optim.Adam([*self.parameters(), *self.slimkit.parameters()], lr=3e-3)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # under torchrun: one device per process it started on this machine
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    parser.add_argument("--devices", type=int, default=local, help="processes on this machine")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", type=Path, help="every rank writes DIR/rank{R}.pt")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the data order fixed")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train, test = digits()
    steps = args.epochs * -(-TRAIN_ROWS // GLOBAL_BATCH)  # optimizer steps, on any number of ranks
    slimkit = CompressionCallback(
        [
            MagnitudePruningConfig(
                schedule={"kind": "polynomial", "final": 0.7, "end": steps // 2, "frequency": 10}
            ),
            QATConfig(wbits=8, abits=8),
        ],
        submodule="net",
        calibration_batches=[train.tensors[0][:256]],  # QAT's initial activation ranges
    )
    lit = Lit(slimkit, train, shuffle=not args.no_shuffle)
    world = int(os.environ.get("WORLD_SIZE", args.devices))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[slimkit],
        accelerator="cpu",
        devices=args.devices,
        num_nodes=max(1, world // args.devices),
        strategy="ddp" if world > 1 else "auto",  # gloo on CPU
        use_distributed_sampler=False,  # train_dataloader shards the data itself
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit)
    prune = slimkit.compressor.techniques[0]
    lit.eval()
    with torch.no_grad():
        x, y = test.tensors
        accuracy = (lit.net(x).argmax(1) == y).float().mean().item()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in lit.net.state_dict().items()}
        result = {"state": state, "sparsity": prune.overall_sparsity(), "accuracy": accuracy}
        result.update(world_size=trainer.world_size, steps=trainer.global_step)
        torch.save(result, args.out / f"rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        print(f"sparsity={prune.overall_sparsity():.3f}")
        print(f"accuracy={accuracy:.4f}")
    distributed.shutdown()  # a barrier, then leave the group: no rank tears gloo down early


if __name__ == "__main__":
    main()

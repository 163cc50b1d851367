"""Compress a small CNN on scikit-learn's digits with PyTorch Lightning: gradual magnitude
pruning to 70% plus LSQ quantization-aware training, driven by ``CompressionCallback``.

    python examples/lightning_example.py        # about 10-20 s on one CPU core

Under DDP use Lightning's own strategy: ``pl.Trainer(strategy="ddp", devices=2, ...)``.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from slimkit.integrations.lightning import CompressionCallback
from slimkit.prune import MagnitudePruningConfig
from slimkit.quant import QATConfig

EPOCHS = 8


def digits() -> tuple[TensorDataset, TensorDataset]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


class Lit(pl.LightningModule):
    def __init__(self, slimkit: CompressionCallback) -> None:
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

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        return self.slimkit.training_loss(F.cross_entropy(logits, y), logits, batch)

    def configure_optimizers(self):  # runs after the callback applied QAT: sees its scales
        return torch.optim.Adam([*self.parameters(), *self.slimkit.parameters()], lr=3e-3)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train, test = digits()
    loader = DataLoader(train, batch_size=64, shuffle=True)
    steps = EPOCHS * len(loader)
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
    lit = Lit(slimkit)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        callbacks=[slimkit],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit, loader)
    prune = slimkit.compressor.techniques[0]
    lit.eval()
    with torch.no_grad():
        x, y = test.tensors
        accuracy = (lit.net(x).argmax(1) == y).float().mean().item()
    print(f"sparsity={prune.overall_sparsity():.3f}")
    print(f"accuracy={accuracy:.4f}")


if __name__ == "__main__":
    main()

"""SlimkitCallback under a real PyTorch Lightning Trainer (CPU, a few steps on random data)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")

from slimkit.core.compressor import Compressor  # noqa: E402
from slimkit.errors import ConfigError, StateError  # noqa: E402
from slimkit.integrations.lightning import SlimkitCallback  # noqa: E402
from slimkit.prune import MagnitudePruningConfig  # noqa: E402
from slimkit.prune.structured import StructuredPruningConfig  # noqa: E402
from slimkit.quant import QATConfig  # noqa: E402
from slimkit.quant.qat import lsq_weight_quantizer_of  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*LeafSpec.*",  # Lightning's own use of torch's pytree
    "ignore:Be aware that when using `ckpt_path`:UserWarning",
)

STEPS = 6  # two epochs of three batches
GRADUAL = {"schedule": {"kind": "polynomial", "final": 0.75, "end": STEPS, "frequency": 2}}


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def make_loader(batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 16, generator=generator)
    y = torch.randint(0, 4, (24,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Lit(pl.LightningModule):
    """Cross-entropy classifier; the loss goes through ``callback.training_loss``."""

    def __init__(self, slimkit: SlimkitCallback | None = None, lr: float = 0.1) -> None:
        super().__init__()
        self.net = make_net()
        self.slimkit = slimkit
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        if self.slimkit is not None:
            loss = self.slimkit.training_loss(loss, logits, batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False, logger=False)
        return loss

    def configure_optimizers(self):
        extra = list(self.slimkit.parameters()) if self.slimkit is not None else []
        return torch.optim.SGD([*self.parameters(), *extra], lr=self.lr)


def trainer(max_steps: int = STEPS, **kwargs) -> pl.Trainer:
    callbacks = kwargs.get("callbacks", [])
    checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def masks(model: nn.Module) -> list[torch.Tensor]:
    return [
        m.parametrizations.weight[0].mask.clone()
        for m in model.modules()
        if parametrize.is_parametrized(m, "weight")
    ]


def plain_loop(batch_size: int = 8, steps: int = STEPS) -> tuple[nn.Module, Compressor]:
    """The reference: the same net, data and SGD, driven by hand."""
    net = make_net()
    compressor = Compressor([MagnitudePruningConfig(**GRADUAL)]).apply(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    taken = 0
    while taken < steps:
        for x, y in make_loader(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            compressor.step()
            taken += 1
            if taken == steps:
                break
    return net, compressor


def fit_pruned(
    batch_size: int = 8, ckpt_path=None, checkpoints=None
) -> tuple[Lit, SlimkitCallback]:
    callback = SlimkitCallback([MagnitudePruningConfig(**GRADUAL)], submodule="net")
    lit = Lit(callback)
    callbacks = [callback] if checkpoints is None else [callback, checkpoints]
    trainer(callbacks=callbacks).fit(lit, make_loader(batch_size), ckpt_path=ckpt_path)
    return lit, callback


@pytest.fixture(scope="module")
def reference() -> tuple[nn.Module, Compressor]:
    return plain_loop()


def test_gradual_pruning_reaches_target_and_matches_the_plain_loop(reference) -> None:
    lit, callback = fit_pruned()
    net, compressor = reference
    assert callback.compressor.step_count == compressor.step_count == STEPS
    technique = callback.compressor.techniques[0]
    assert technique.layer_sparsity() == {"0": 0.75, "2": 0.75}
    # bit-identical: same data, seed and float ops in the same order on CPU
    for got, want in zip(masks(lit.net), masks(net), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(lit.net.parameters(), net.parameters(), strict=True):
        assert torch.equal(got, want)
    # scalars logged on the schedule's last update step
    metrics = lit.trainer.callback_metrics
    assert float(metrics["magnitude_prune/sparsity/overall"]) == pytest.approx(0.75)
    assert float(metrics["magnitude_prune/sparsity/target"]) == pytest.approx(0.75)


def test_checkpoint_resumes_the_compressor_exactly(tmp_path) -> None:
    # One batch per epoch: Lightning restarts a plain DataLoader from its first batch when it
    # resumes, so only then is the resumed data order the uninterrupted one.
    every_epoch = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
    )
    fit_pruned(batch_size=24, checkpoints=every_epoch)
    path = tmp_path / "epoch=2-step=3.ckpt"  # as if the run had been killed after 3 steps
    saved = torch.load(path, weights_only=True)["callbacks"]
    assert [s["compressor"]["step_count"] for s in saved.values() if "compressor" in s] == [3]

    resumed, callback = fit_pruned(batch_size=24, ckpt_path=path)
    net, compressor = plain_loop(batch_size=24)
    assert resumed.trainer.global_step == STEPS
    assert callback.compressor.state_dict() == compressor.state_dict()  # step count, thresholds
    for got, want in zip(masks(resumed.net), masks(net), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(resumed.net.parameters(), net.parameters(), strict=True):
        assert torch.equal(got, want)


class ScaleRecorder(pl.Callback):
    """Records the first layer's weight scale at fit start and fit end (before finalize)."""

    def __init__(self) -> None:
        self.scales: dict[str, torch.Tensor] = {}

    def _record(self, key: str, pl_module: Lit) -> None:
        self.scales[key] = lsq_weight_quantizer_of(pl_module.net[0]).scale.detach().abs().clone()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._record("start", pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._record("end", pl_module)


def test_qat_trains_and_finalizes_on_the_grid() -> None:
    batches = [(x,) for x, _ in make_loader()]
    callback = SlimkitCallback(
        QATConfig(wbits=4),
        submodule="net",
        calibration_batches=batches,
        finalize_on_fit_end=True,
    )
    recorder = ScaleRecorder()
    lit = Lit(callback, lr=0.05)
    trainer(callbacks=[recorder, callback]).fit(lit, make_loader())

    assert torch.isfinite(lit.trainer.callback_metrics["train_loss"])
    assert not torch.equal(recorder.scales["start"], recorder.scales["end"])  # scales trained
    first = lit.net[0]
    assert type(first) is nn.Linear and not parametrize.is_parametrized(first)
    codes = first.weight / recorder.scales["end"].reshape(-1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.abs().max() <= 7 + 1e-4
    assert callback.compressor.finalized and callback.model is lit.net


class FrozenOptimizer(Lit):
    """Builds its optimizer from parameters captured before setup: misses QAT's scales."""

    def __init__(self, slimkit: SlimkitCallback) -> None:
        super().__init__(slimkit)
        self.early = list(self.parameters())

    def configure_optimizers(self):
        return torch.optim.SGD(self.early, lr=0.1)


def test_optimizer_without_slimkit_parameters_is_an_error() -> None:
    callback = SlimkitCallback(QATConfig(), submodule="net")
    with pytest.raises(StateError, match=r"net\.0\.parametrizations\.weight\.0\.scale"):
        trainer(callbacks=[callback]).fit(FrozenOptimizer(callback), make_loader())


def test_gradual_structured_pruning_rebuilds_the_optimizer() -> None:
    config = StructuredPruningConfig(
        schedule={"kind": "polynomial", "final": 0.5, "end": 4, "frequency": 2}, round_to=1
    )
    callback = SlimkitCallback(config, submodule="net", example_inputs=(torch.zeros(1, 16),))
    lit = Lit(callback)
    fitted = trainer(callbacks=[callback])
    fitted.fit(lit, make_loader())
    assert lit.net[0].out_features == 16
    held = {id(p) for group in fitted.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in lit.parameters()} <= held


def test_structured_steps_without_optimizer_rebuild_are_an_error() -> None:
    config = StructuredPruningConfig(
        schedule={"kind": "polynomial", "final": 0.5, "end": 2, "frequency": 2}, round_to=1
    )
    callback = SlimkitCallback(
        config, submodule="net", example_inputs=(torch.zeros(1, 16),), rebuild_optimizers=False
    )
    with pytest.raises(StateError, match=r"replaced parameters at step 2.*one-shot"):
        trainer(callbacks=[callback]).fit(Lit(callback), make_loader())


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="got a str"):
        SlimkitCallback(["magnitude_prune"])
    with pytest.raises(ConfigError, match="empty"):
        SlimkitCallback([])
    callback = SlimkitCallback(MagnitudePruningConfig(sparsity=0.5), submodule="missing")
    with pytest.raises(ConfigError, match="submodule 'missing' not found"):
        trainer(callbacks=[callback]).fit(Lit(callback), make_loader())
    with pytest.raises(ConfigError, match="expected one CompressionCallback"):
        SlimkitCallback.of(trainer())

"""PyTorch Lightning: ``CompressionCallback`` drives a Compressor from ``Trainer.fit``.

::

    import pytorch_lightning as pl            # or: import lightning.pytorch as pl
    from slimkit.integrations.lightning import CompressionCallback

    slimkit = CompressionCallback([MagnitudePruningConfig(schedule=...)], submodule="net")
    # or one stage of a recipe: CompressionCallback("recipe.yaml", stage="prune", submodule="net")

    class Lit(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            return slimkit.training_loss(loss, logits, batch)    # only needed for distillation

        def configure_optimizers(self):                          # built after setup: sees QAT
            return torch.optim.Adam([*self.parameters(), *slimkit.parameters()])  # scales, adapters

    pl.Trainer(callbacks=[slimkit], max_steps=1000).fit(Lit(), loader)

What the callback does, hook by hook:

* ``setup`` (every stage, before Lightning restores a checkpoint or builds optimizers):
  ``compressor.apply`` to the LightningModule, or to its ``submodule`` (a dotted attribute path,
  for a module that wraps the model). For the first ``fit`` it then runs ``before_training``
  on the ``calibration_batches`` (QAT range init); when resuming, the checkpoint's state then
  replaces what it set.
  Magnitude masks are parametrizations that keep the weight's Parameter object; QAT scales are
  new parameters, which ``configure_optimizers`` sees because it runs after ``setup``.
* ``on_fit_start``: checks that the optimizers hold every trainable parameter ``apply`` created
  and the techniques' own (``callback.parameters()``: distillation adapters), else a StateError.
* ``on_train_batch_end``: one ``compressor.step()`` per optimizer step taken (it follows
  ``trainer.global_step``, so gradient accumulation steps the compressor once per update).
  Technique scalars are logged with ``pl_module.log_dict`` as ``{kind}/{tag}`` when a technique
  acted and every ``trainer.log_every_n_steps`` steps. When a step replaced parameters
  (gradual structured pruning), the optimizers are rebuilt with
  ``trainer.strategy.setup_optimizers(trainer)`` (calls ``configure_optimizers`` again; learning
  rates and LR scheduler positions carry over, optimizer state such as momentum restarts). That
  works on a single device; otherwise, or with ``rebuild_optimizers=False``, a StateError asks
  for a one-shot schedule (prune in ``apply``, then fine-tune).
* ``on_fit_end``: ``after_training`` on the ``calibration_batches`` (static PTQ calibration), and
  ``finalize()`` only with ``finalize_on_fit_end=True`` (the module's weights become plain).
* ``state_dict``/``load_state_dict``: the compressor's state travels in Lightning checkpoints
  (``ModelCheckpoint``, ``trainer.save_checkpoint``), so ``fit(ckpt_path=...)`` resumes exactly;
  masks and quantizer scales are module state and travel in the model's ``state_dict``.

Losses: Lightning only sees the loss ``training_step`` returns, so a technique that adds a loss
(distillation) needs ``callback.training_loss(task_loss, outputs, batch)`` there
(``task_loss_weight * task_loss + compressor.loss(outputs, batch)``); reach the callback through
a reference you keep or ``CompressionCallback.of(self.trainer)``.

DDP: use Lightning's own strategy (``pl.Trainer(strategy="ddp", devices=N)``; on CPU it uses
gloo), started by ``torchrun --standalone --nproc_per_node N script.py`` (Lightning detects the
torchelastic environment) or by Lightning itself. The strategy creates the process group before
``setup`` and wraps the module in ``DistributedDataParallel`` after it, so the callback applies the
techniques to the plain module on every rank, and DDP then keeps weights, masks and LSQ scales in
sync. The techniques keep their own decisions identical across ranks (magnitude masks are
broadcast from rank 0, EMA/Taylor importances and QAT range statistics are averaged) through
:mod:`slimkit.distributed`, which uses the process group the strategy created; every rank calls
``compressor.step()`` at the same optimizer steps. The callback writes no files itself (its state
travels in Lightning's checkpoints, which rank 0 writes). ``examples/lightning_example.py`` runs
this way; ``tests/integrations/test_ddp_integrations.py`` checks that the ranks end bit-identical.

``SlimkitCallback`` is the former name of ``CompressionCallback`` and stays an alias (the
checkpoint key is still ``SlimkitCallback{...}``, so older checkpoints resume).

Works with the ``pytorch_lightning`` and the ``lightning.pytorch`` Trainer: the callback derives
from the ``Callback`` class of each one installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from typing import Any

from torch import nn

from slimkit.core.technique import Technique
from slimkit.errors import ConfigError, StateError
from slimkit.integrations._common import (
    CompressorDriver,
    DriverAccess,
    Techniques,
    require,
    shorten,
)

__all__ = ["CompressionCallback", "SlimkitCallback"]

_FLAVOURS = ("lightning.pytorch", "pytorch_lightning")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a broken module
        return False


def _callback_bases() -> tuple[type, ...]:
    flavours = [name for name in _FLAVOURS if _installed(name)]
    if not flavours:  # raise the one-line error that names the package
        require("pytorch_lightning", "pytorch-lightning", "slimkit.integrations.lightning")
    return tuple(importlib.import_module(name).Callback for name in flavours)


def _lightning_root(trainer: Any) -> str:
    """``lightning.pytorch`` or ``pytorch_lightning``: the package of this ``trainer``."""
    module = type(trainer).__module__
    return next((name for name in _FLAVOURS if module.startswith(name + ".")), _FLAVOURS[1])


class CompressionCallback(DriverAccess, *_callback_bases()):  # type: ignore[misc]
    """A Lightning callback that applies, steps and finalizes a Compressor (module docstring).

    ``compressor``: a :class:`~slimkit.core.compressor.Compressor`, a technique or technique
    config, a list of them, or a recipe (a :class:`~slimkit.recipe.schema.Recipe` or its YAML
    path) whose ``stage`` (name or index; needed when the recipe has several stages) gives the
    techniques. ``submodule``: dotted attribute path of the model inside the
    LightningModule (None: the LightningModule itself). ``calibration_batches``: re-iterable
    batches for ``before_training`` (in ``setup``) and ``after_training`` (in ``on_fit_end``).
    ``example_inputs``: for techniques that trace the model (structured pruning, distillation
    adapters). ``name``: makes the checkpoint key unique when a Trainer has several of these.
    """

    def __init__(
        self,
        compressor: Techniques,
        *,
        submodule: str | None = None,
        calibration_batches: Iterable[Any] | None = None,
        example_inputs: Any = None,
        finalize_on_fit_end: bool = False,
        rebuild_optimizers: bool = True,
        name: str | None = None,
        stage: str | int | None = None,
    ) -> None:
        super().__init__()
        self.driver = CompressorDriver(
            compressor,
            submodule=submodule,
            calibration_batches=calibration_batches,
            example_inputs=example_inputs,
            finalize_at_end=finalize_on_fit_end,
            stage=stage,
        )
        self.rebuild_optimizers = bool(rebuild_optimizers)
        self.name = name
        self._seen_global_step = 0

    # --- what the LightningModule calls (training_loss, parameters: see DriverAccess) ---------
    def scalars(self) -> dict[str, float]:
        """Every technique's current scalars, as logged (``{kind}/{tag}``)."""
        return self.driver.scalars()

    @classmethod
    def of(cls, trainer: Any, name: str | None = None) -> CompressionCallback:
        """The CompressionCallback among ``trainer.callbacks`` (the one called ``name``)."""
        found = [
            c for c in trainer.callbacks if isinstance(c, cls) and (name is None or c.name == name)
        ]
        if len(found) != 1:
            what = "CompressionCallback" + (f" named {name!r}" if name is not None else "")
            raise ConfigError(f"expected one {what} in trainer.callbacks, found {len(found)}")
        return found[0]

    # --- Lightning hooks ------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # the former class name, so checkpoints written before the rename still resume
        return f"SlimkitCallback{ ({'name': self.name})!r}"

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        self.driver.attach(pl_module)
        if stage == "fit":
            self.driver.before_training()

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        missing = self.driver.missing_parameters(trainer.optimizers)
        if missing:
            raise StateError(
                f"the optimizers do not hold slimkit's trainable parameters ({shorten(missing)}): "
                "build them in configure_optimizers from self.parameters() plus "
                "callback.parameters()"
            )

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._seen_global_step = trainer.global_step  # after Lightning restored its loops

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        taken = trainer.global_step - self._seen_global_step
        if taken <= 0:  # gradient accumulation: no optimizer step on this batch
            return
        self._seen_global_step = trainer.global_step
        compressor = self.compressor
        updated: list[Technique] = []
        for _ in range(taken):
            compressor.step()
            updated += [t for t in compressor.updated if t not in updated]
            if compressor.parameters_replaced:
                self._rebuild_optimizers(trainer)
        every = trainer.log_every_n_steps
        periodic = every > 0 and trainer.global_step % every == 0
        scalars = self.driver.scalars(None if periodic else updated)
        if scalars:
            pl_module.log_dict(scalars, on_step=True, on_epoch=False, logger=bool(trainer.loggers))

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        model = self.driver.end()
        if model is not None and model is not self.driver.target(pl_module):
            self._replace_model(pl_module, model)

    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.driver.load_state_dict(state_dict)

    # --- helpers --------------------------------------------------------------------------------
    def _rebuild_optimizers(self, trainer: Any) -> None:
        step = self.compressor.step_count
        if not self.rebuild_optimizers:
            raise StateError(
                f"structured pruning replaced parameters at step {step} and rebuild_optimizers is "
                "off: use a one-shot schedule (prune in apply, then fine-tune)"
            )
        strategy = trainer.strategy
        strategies = importlib.import_module(_lightning_root(trainer) + ".strategies")
        if not isinstance(strategy, strategies.SingleDeviceStrategy):
            raise StateError(
                f"structured pruning replaced parameters at step {step}: rebuilding the optimizer "
                f"works on a single device, not under {type(strategy).__name__}; use a one-shot "
                "schedule (prune in apply, then fine-tune)"
            )
        old_optimizers = list(strategy.optimizers)
        old_schedulers = list(strategy.lr_scheduler_configs)
        strategy.setup_optimizers(trainer)  # configure_optimizers again, on the sliced model
        new_optimizers, new_schedulers = strategy.optimizers, strategy.lr_scheduler_configs
        groups = [len(o.param_groups) for o in old_optimizers]
        if groups != [len(o.param_groups) for o in new_optimizers] or len(old_schedulers) != len(
            new_schedulers
        ):
            raise StateError(
                f"configure_optimizers returned a different set of optimizers, param groups or "
                f"schedulers when rebuilt at step {step}; keep their structure fixed"
            )
        for old, new in zip(old_optimizers, new_optimizers, strict=True):
            for old_group, new_group in zip(old.param_groups, new.param_groups, strict=True):
                new_group["lr"] = old_group["lr"]
        for old, new in zip(old_schedulers, new_schedulers, strict=True):
            new.scheduler.load_state_dict(old.scheduler.state_dict())

    def _replace_model(self, pl_module: nn.Module, model: nn.Module) -> None:
        if self.driver.submodule is None:
            raise StateError(
                "finalize returned a new model object, which cannot replace the LightningModule; "
                "compress a submodule (submodule='...') instead"
            )
        pl_module.set_submodule(self.driver.submodule, model)


SlimkitCallback = CompressionCallback
"""The former name of :class:`CompressionCallback`."""

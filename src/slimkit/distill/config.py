"""Configs of the ``distill`` technique (data only; see :mod:`slimkit.distill.technique`).

Each configured loss becomes one weighted term with a stable key (``soft_label/kl``,
``hint/<student>:<teacher>``, ``fsp/<s0>,<s1>:<t0>,<t1>``) used in summaries and TensorBoard tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, model_validator

from slimkit.core.config import Config

__all__ = [
    "DistillationConfig",
    "FSPPairConfig",
    "FeaturePairConfig",
    "LossTerm",
    "SoftLabelConfig",
    "loss_terms",
]

ModuleName = Annotated[str, Field(min_length=1)]
Weight = Annotated[float, Field(ge=0.0)]


class SoftLabelConfig(Config):
    """Soft labels on the logits: ``kl`` is ``T^2 * KL(p_T || p_S)`` (Hinton et al. 2015),
    ``cross_entropy`` is PaddleSlim's soft-label cross-entropy (no ``T^2``)."""

    loss: Literal["kl", "cross_entropy"] = "kl"
    temperature: float = Field(4.0, gt=0.0)
    weight: Weight = 1.0


class FeaturePairConfig(Config):
    """One student module's output compared with one teacher module's output.

    ``hint``: MSE after an adapter (FitNets); ``attention``: attention transfer (4-D maps, any
    channel counts); ``cosine``: ``1 - cos`` after an adapter (embeddings).
    """

    student: ModuleName
    teacher: ModuleName
    loss: Literal["hint", "attention", "cosine"] = "hint"
    weight: Weight = 1.0


class FSPPairConfig(Config):
    """An FSP term (Yim et al. 2017): the FSP matrix of two student modules' outputs against that
    of two teacher modules' outputs. Each pair must have one spatial size; student channels are
    mapped to the teacher's by 1x1-conv adapters when they differ."""

    student: tuple[ModuleName, ModuleName]
    teacher: tuple[ModuleName, ModuleName]
    weight: Weight = 1.0


class DistillationConfig(Config):
    """Distil a frozen teacher into the student (see the module docstring).

    ``teacher`` says where the runner gets the teacher: ``baseline`` (the trained baseline),
    ``previous_stage`` (the model entering this stage, before its techniques: self-distillation),
    or a checkpoint path of the same architecture (loaded with ``weights_only=True``). The
    technique itself only ever sees the model passed to :meth:`Distillation.bind`.
    ``task_weight`` is the weight of the task loss, applied by the training loop.
    """

    kind: Literal["distill"] = "distill"
    teacher: Literal["baseline", "previous_stage"] | str = "baseline"
    soft_label: SoftLabelConfig | None = SoftLabelConfig()
    pairs: list[FeaturePairConfig] = Field(default_factory=list)
    fsp: list[FSPPairConfig] = Field(default_factory=list)
    task_weight: Weight = 1.0

    @model_validator(mode="after")
    def _check(self) -> DistillationConfig:
        if not self.teacher.strip():
            raise ValueError("teacher must be 'baseline', 'previous_stage' or a checkpoint path")
        if self.soft_label is None and not self.pairs and not self.fsp:
            raise ValueError("nothing to distill: give soft_label, pairs or fsp")
        keys = [term.key for term in loss_terms(self)]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"terms given twice: {', '.join(repeated)}")
        return self


@dataclass(frozen=True)
class LossTerm:
    """One weighted loss term of a config: its ``key``, ``loss`` kind (``kl``, ``cross_entropy``,
    ``hint``, ``attention``, ``cosine``, ``fsp``), the module names on each side, and one adapter
    key per student module ("" where the loss needs none)."""

    key: str
    loss: str
    weight: float
    student: tuple[str, ...]
    teacher: tuple[str, ...]
    adapters: tuple[str, ...]


def loss_terms(config: DistillationConfig) -> list[LossTerm]:
    """The config's terms in order: soft label, then ``pairs``, then ``fsp``."""
    terms = []
    if config.soft_label is not None:
        soft = config.soft_label
        terms.append(LossTerm(f"soft_label/{soft.loss}", soft.loss, soft.weight, (), (), ()))
    for i, pair in enumerate(config.pairs):
        adapter = "" if pair.loss == "attention" else f"pair{i}"
        terms.append(
            LossTerm(
                f"{pair.loss}/{pair.student}:{pair.teacher}",
                pair.loss,
                pair.weight,
                (pair.student,),
                (pair.teacher,),
                (adapter,),
            )
        )
    for i, fsp in enumerate(config.fsp):
        terms.append(
            LossTerm(
                f"fsp/{','.join(fsp.student)}:{','.join(fsp.teacher)}",
                "fsp",
                fsp.weight,
                tuple(fsp.student),
                tuple(fsp.teacher),
                (f"fsp{i}_0", f"fsp{i}_1"),
            )
        )
    return terms

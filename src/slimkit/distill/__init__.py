"""Knowledge distillation: losses, adapters, teachers, and the ``distill`` technique.

See :mod:`slimkit.distill.technique` for how a training loop wires it (bind the teacher, add
:meth:`Distillation.parameters` to the optimizer, scale the task loss by ``task_weight``).
"""

from slimkit.distill.adapters import FeatureAdapter, make_adapter
from slimkit.distill.config import (
    DistillationConfig,
    FeaturePairConfig,
    FSPPairConfig,
    SoftLabelConfig,
)
from slimkit.distill.losses import (
    attention_map,
    attention_transfer,
    cosine_embedding_loss,
    fsp_loss,
    fsp_matrix,
    hint_mse,
    soft_cross_entropy,
    soft_kl,
)
from slimkit.distill.teacher import freeze, frozen_copy, load_teacher
from slimkit.distill.technique import Distillation, Forward, default_forward

__all__ = [
    "Distillation",
    "DistillationConfig",
    "FSPPairConfig",
    "FeatureAdapter",
    "FeaturePairConfig",
    "Forward",
    "SoftLabelConfig",
    "attention_map",
    "attention_transfer",
    "cosine_embedding_loss",
    "default_forward",
    "freeze",
    "frozen_copy",
    "fsp_loss",
    "fsp_matrix",
    "hint_mse",
    "load_teacher",
    "make_adapter",
    "soft_cross_entropy",
    "soft_kl",
]

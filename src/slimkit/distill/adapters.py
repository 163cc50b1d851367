"""Adapters that bring a student feature to the shape of the teacher feature it is compared with.

:func:`make_adapter` builds a :class:`FeatureAdapter` from the two shapes (batch dimension first;
the batch size is ignored):

* 4-D ``(N, C, H, W)`` feature maps: when ``H x W`` differ, the larger side is adaptive-average-
  pooled to the smaller size (student or teacher side; pooling has no parameters); when the
  channels differ, a trainable 1x1 convolution (no bias) maps the student's ``C_S`` channels to the
  teacher's ``C_T`` (the FitNets regressor).
* 2-D ``(N, D)`` and 3-D ``(N, L, D)`` embeddings: a trainable ``Linear(D_S, D_T, bias=False)``
  when the widths differ; the token counts ``L`` must be equal.
* equal shapes (any rank): identity.

The projection's weight is drawn from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch's default
bound) with a private generator seeded by ``seed``, so adapters are the same in every run and
building them does not move the global RNG. Adapters are trained with the student and dropped at
``finalize``; they are never part of the compressed model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from slimkit.errors import ConfigError

__all__ = ["FeatureAdapter", "make_adapter"]


class FeatureAdapter(nn.Module):
    """``forward(student, teacher) -> (student', teacher')`` with equal shapes.

    ``proj`` is an ``nn.Conv2d`` (1x1), an ``nn.Linear`` or ``nn.Identity``; ``student_pool`` and
    ``teacher_pool`` are ``nn.AdaptiveAvgPool2d`` or ``nn.Identity``. The student is pooled first,
    then projected (both are linear, the order only saves work).
    """

    def __init__(
        self,
        student_shape: Sequence[int],
        teacher_shape: Sequence[int],
        proj: nn.Module,
        student_pool: nn.Module,
        teacher_pool: nn.Module,
    ) -> None:
        super().__init__()
        self.student_shape = tuple(int(d) for d in student_shape)
        self.teacher_shape = tuple(int(d) for d in teacher_shape)
        self.proj = proj
        self.student_pool = student_pool
        self.teacher_pool = teacher_pool

    @property
    def trainable(self) -> bool:
        """True when the adapter has parameters (a 1x1 conv or a Linear)."""
        return any(True for _ in self.parameters())

    def adapt_student(self, student: torch.Tensor) -> torch.Tensor:
        """The student side only: pool (when larger), then project."""
        return self.proj(self.student_pool(student))

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapt_student(student), self.teacher_pool(teacher)

    def extra_repr(self) -> str:
        return f"student={self.student_shape[1:]}, teacher={self.teacher_shape[1:]}"


def _projection(module: nn.Module, seed: int) -> nn.Module:
    """Materialise a projection built on the meta device (so construction draws nothing from the
    global RNG) and initialise its weight from a private generator."""
    module = module.to_empty(device="cpu")
    weight = module.weight
    generator = torch.Generator(device="cpu").manual_seed(seed)
    fan_in = math.prod(weight.shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    values = torch.rand(weight.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        weight.copy_((values * 2 - 1) * bound)
    return module


def _describe(student: tuple[int, ...], teacher: tuple[int, ...]) -> str:
    return f"student shape {student} and teacher shape {teacher}"


def make_adapter(
    student_shape: Sequence[int], teacher_shape: Sequence[int], *, seed: int = 0
) -> FeatureAdapter:
    """An adapter that maps a student feature of ``student_shape`` onto ``teacher_shape``.

    See the module docstring for the rules; shapes that no rule bridges (different ranks, token
    counts, or unequal shapes of another rank) raise a one-line :class:`ConfigError`.
    """
    s = tuple(int(d) for d in student_shape)
    t = tuple(int(d) for d in teacher_shape)
    identity = nn.Identity
    if len(s) != len(t):
        raise ConfigError(f"make_adapter: cannot bridge {_describe(s, t)} (different ranks)")
    if s[1:] == t[1:]:
        return FeatureAdapter(s, t, identity(), identity(), identity())
    if len(s) == 4:
        s_pool: nn.Module = identity()
        t_pool: nn.Module = identity()
        size = (min(s[2], t[2]), min(s[3], t[3]))
        if s[2:] != size:
            s_pool = nn.AdaptiveAvgPool2d(size)
        if t[2:] != size:
            t_pool = nn.AdaptiveAvgPool2d(size)
        proj: nn.Module = identity()
        if s[1] != t[1]:
            proj = _projection(nn.Conv2d(s[1], t[1], 1, bias=False, device="meta"), seed)
        return FeatureAdapter(s, t, proj, s_pool, t_pool)
    if len(s) in (2, 3):
        if len(s) == 3 and s[1] != t[1]:
            raise ConfigError(
                f"make_adapter: cannot bridge {_describe(s, t)}: the token counts differ"
            )
        proj = _projection(nn.Linear(s[-1], t[-1], bias=False, device="meta"), seed)
        return FeatureAdapter(s, t, proj, identity(), identity())
    raise ConfigError(
        f"make_adapter: cannot bridge {_describe(s, t)}; adapters handle 2-D (N, D), "
        "3-D (N, L, D) and 4-D (N, C, H, W) features"
    )

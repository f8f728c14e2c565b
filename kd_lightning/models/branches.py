"""A group of students of one registered backbone: branch-based (a shared trunk) or network-based (nothing shared).

Online distillation methods (OKDDip, ONE, CL-ILR, DML) train ``m`` students of one architecture together. Built on
the backbone contract (``stem -> stages -> head -> classifier``, see :mod:`kd_lightning.models.registry`), so it works
for every registered backbone:

* **branch-based** (``shared_stages = k``): one trunk ``stem + stages[:k]`` shared by all students; student ``i`` owns
  ``stages[k:] + head + classifier``. Lan et al. (ONE) and Chen et al. (OKDDip) share all stages but the last on
  CIFAR (the default, :func:`default_shared_stages`) and all but the last two on ImageNet.
* **network-based** (``shared_stages = None``): ``m`` whole networks, stems included (DML, OKDDip's first column).

Every student's own part comes from a separately built backbone, so the students are initialised independently,
each with its backbone's own initialisation (He init ...); the trunk is the first one's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kd_lightning.models.registry import Backbone, create_backbone, weights_loaded_later

__all__ = ["GroupOutput", "StudentGroup", "default_shared_stages", "scale_gradient"]


def default_shared_stages(backbone: Backbone) -> int:
    """Stages shared by the branches by default: all but the last (the CIFAR split of ONE and OKDDip)."""
    return len(backbone.stages) - 1


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``factor`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged, its gradient multiplied by ``factor`` (CL-ILR's backpropagation rescaling, Song & Chai 2018)."""
    return _ScaleGradient.apply(x, factor)


class GroupOutput(NamedTuple):
    """What :meth:`StudentGroup.forward` returns.

    Attributes:
        trunk: ``(B, ...)`` output of the shared trunk (the input itself for a network-based group).
        features: ``(m, B, D)`` every student's pooled last-stage features (its ``forward_features``).
        logits: ``(m, B, C)`` every student's logits.
    """

    trunk: Tensor
    features: Tensor
    logits: Tensor


class StudentGroup(nn.Module):
    """``m`` students of the registered backbone ``backbone``, sharing ``stem + stages[:shared_stages]``.

    Attributes:
        trunk: ``nn.Sequential(stem, *stages[:k])`` (None for a network-based group).
        students: ``nn.ModuleList`` of ``m`` :class:`Backbone` objects holding each student's own part: the later
            stages, head and classifier (stem and all stages too when network-based; an ``nn.Identity`` stem
            otherwise). ``students[i].forward_features(trunk(x))`` gives student ``i``'s features.

    Args:
        backbone: name of a registered backbone.
        num_classes: outputs of every student.
        num_students: ``m >= 1``.
        shared_stages: ``k``, the stages in the trunk, in ``[0, len(stages) - 1]`` (0: only the stem is shared);
            None: network-based (nothing shared).
        backbone_kwargs: keyword arguments of the backbone factory.

    Raises:
        ValueError: ``num_students < 1``, ``shared_stages`` out of range (the message gives the range), or given for
            a backbone that cannot be split at its stages (see ``Backbone.unsplittable_reason``).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        num_students: int,
        shared_stages: int | None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_students < 1:
            raise ValueError(f"num_students must be >= 1, got {num_students}")
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.backbone_kwargs = dict(backbone_kwargs or {})
        networks = [create_backbone(backbone, num_classes, **self.backbone_kwargs) for _ in range(num_students)]
        num_stages = len(networks[0].stages)
        unsplittable = networks[0].unsplittable_reason
        if shared_stages is not None and unsplittable is not None:
            raise ValueError(f"a branch-based group shares the first stages of its backbone, but {unsplittable}")
        if shared_stages is not None and not 0 <= shared_stages < num_stages:
            raise ValueError(
                f"shared_stages must be in [0, {num_stages - 1}] for backbone {backbone!r} ({num_stages} stages: the "
                f"last one is never shared), or None (network-based), got {shared_stages}"
            )
        self.shared_stages = shared_stages
        self.input_shape = networks[0].input_shape
        if shared_stages is None:
            self.trunk = None
        else:
            self.trunk = nn.Sequential(networks[0].stem, *networks[0].stages[:shared_stages])
            for net in networks:
                net.stem = nn.Identity()
                net.stages = nn.ModuleList(net.stages[shared_stages:])
        self.students = nn.ModuleList(networks)

    @property
    def num_students(self) -> int:
        return len(self.students)

    @property
    def num_features(self) -> int:
        """Width ``D`` of every student's features."""
        return self.students[0].num_features

    def forward(self, x: Tensor, trunk_grad_scale: float = 1.0) -> GroupOutput:
        """Trunk output, ``(m, B, D)`` features and ``(m, B, C)`` logits of all students.

        Args:
            x: ``(B, ...)`` input.
            trunk_grad_scale: multiplies the gradient that flows from the students into the trunk (CL-ILR: 1/m).
        """
        trunk = x if self.trunk is None else self.trunk(x)
        shared = scale_gradient(trunk, trunk_grad_scale) if trunk_grad_scale != 1.0 else trunk
        features = torch.stack([student.forward_features(shared) for student in self.students])
        logits = torch.stack([student.classifier(f) for student, f in zip(self.students, features, strict=True)])
        return GroupOutput(trunk, features, logits)

    def student_logits(self, x: Tensor, index: int) -> Tensor:
        """``(B, C)`` logits of student ``index`` alone (trunk + its branch)."""
        trunk = x if self.trunk is None else self.trunk(x)
        return self.students[index](trunk)

    @torch.no_grad()
    def trunk_width(self) -> int:
        """Channels (or features) of the trunk's output, from one forward of a zero input in eval mode."""
        if self.trunk is None:
            return self.input_shape[0]
        was_training = self.trunk.training
        self.trunk.eval()
        device = next(self.trunk.parameters(), torch.empty(0)).device
        width = self.trunk(torch.zeros(1, *self.input_shape, device=device)).shape[1]
        self.trunk.train(was_training)
        return width

    def export(self, index: int) -> Backbone:
        """Student ``index`` as a plain, independent backbone of the registered class (weights copied).

        Its ``state_dict`` has the keys of ``create_backbone(backbone)``, so it loads anywhere a backbone does
        (a :class:`~kd_lightning.ClassifierModule`, a :class:`~kd_lightning.FrozenTeacher` ...).
        """
        if not -self.num_students <= index < self.num_students:
            raise IndexError(f"student index {index} out of range for {self.num_students} students")
        student = self.students[index]
        state: dict[str, Tensor] = {}
        if self.trunk is None:
            state.update(student.state_dict())
        else:
            k = self.shared_stages
            for key, value in self.trunk.state_dict().items():
                position, _, rest = key.partition(".")
                name = "stem" if position == "0" else f"stages.{int(position) - 1}"
                state[f"{name}.{rest}"] = value
            for key, value in student.state_dict().items():
                if key.startswith("stages."):
                    _, position, rest = key.split(".", 2)
                    key = f"stages.{int(position) + k}.{rest}"
                elif key.startswith("stem."):
                    continue
                state[key] = value
        # The fresh network consumes random numbers for its throw-away initialisation: keep the caller's RNG as it was.
        with torch.random.fork_rng(devices=[]), weights_loaded_later():
            network = create_backbone(self.backbone_name, self.num_classes, **self.backbone_kwargs)
        network.load_state_dict({key: value.detach().clone() for key, value in state.items()})
        return network.to(next(student.parameters()).device)

"""Teacher distributions :math:`\\rho` of Tang et al., "Understanding and Improving Knowledge Distillation" (2020).

Pure functions of tensors: each returns a ``(B, K)`` distribution (rows sum to 1) that
:class:`~kd_lightning.modules.distill.DistillModule` distils with
:math:`(1-\\alpha)\\,\\mathrm{CE} + \\alpha T^2 \\mathrm{KL}(\\rho \\,\\|\\, p^s_T)` (Eq. 2 with the :math:`T^2` of
App. 7.2). Notation: ``B`` samples, ``K`` classes, ``t`` the ground-truth class, :math:`p^t` the teacher's softmax
at temperature :math:`T`.

* ``kd``: :math:`\\rho = p^t` (Hinton et al. 2015).
* ``ls``: uniform :math:`1/K` (label smoothing as a teacher, Sec. 3.1). No teacher.
* ``pt``: :math:`p^t_t` on t, :math:`(1-p^t_t)/(K-1)` elsewhere (Sec. 4): gradient rescaling only.
* ``sim``: softmax of sharpened cosines of the teacher's class weights (Sec. 4, App. 7.2): class relationships
  only. No teacher forward (a class table).
* ``pt+sim``: :math:`\\lambda\\rho^{pt} + (1-\\lambda)\\rho^{sim}` (Sec. 4).
* ``topk``: the teacher's k largest probabilities kept, the rest spread uniformly (Sec. 5.3).
* ``rel``: fixed masses for the ground truth, its super-class and the rest (App. 8, Eq. 5). No teacher (a class
  table from the super-classes).
* ``pt+rel``: :math:`\\lambda\\rho^{pt} + (1-\\lambda)\\rho^{rel}` (App. 8).

``sim`` and ``rel`` depend on the class only, so they are rows of a ``(K, K)`` table built once
(:func:`sim_table`, :func:`rel_table`) and indexed by the labels (:func:`table_target`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TABLE_OF_KIND",
    "TARGET_KINDS",
    "TEACHER_FORWARD_KINDS",
    "TargetKind",
    "check_target_kind",
    "gradient_rescaling",
    "kd_target",
    "mix_targets",
    "pt_target",
    "rel_table",
    "sim_table",
    "table_target",
    "teacher_distribution",
    "topk_target",
    "uniform_target",
]

#: A target kind (the ``target_kind`` of :class:`~kd_lightning.modules.distill.DistillModule`).
TargetKind = Literal["kd", "ls", "pt", "sim", "pt+sim", "topk", "rel", "pt+rel"]
#: Every target kind, in the order of the paper.
TARGET_KINDS: tuple[str, ...] = get_args(TargetKind)
#: Kinds whose target depends on the teacher's output for the batch (the others never run the teacher).
TEACHER_FORWARD_KINDS: frozenset[str] = frozenset({"kd", "pt", "pt+sim", "topk", "pt+rel"})
#: Kind -> the class table it reads (``"sim"``: from the teacher's classifier, ``"rel"``: from the super-classes).
TABLE_OF_KIND: dict[str, str] = {"sim": "sim", "pt+sim": "sim", "rel": "rel", "pt+rel": "rel"}


def check_target_kind(kind: str) -> str:
    """Returns ``kind`` if it is one of :data:`TARGET_KINDS`.

    Raises:
        ValueError: an unknown kind (the message lists the valid ones).
    """
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; valid kinds: {', '.join(TARGET_KINDS)}")
    return kind


def kd_target(teacher_logits: Tensor, temperature: float) -> Tensor:
    """Vanilla KD: :math:`\\rho = p^t = \\mathrm{softmax}(z^t / T)`, float32. ``(B, K)`` -> ``(B, K)``."""
    return (teacher_logits.float() / temperature).softmax(dim=-1)


def uniform_target(target: Tensor, num_classes: int) -> Tensor:
    """Label smoothing's teacher (Sec. 3.1): :math:`\\rho_i = 1/K` for every sample. ``(B,)`` labels -> ``(B, K)``."""
    return torch.full((len(target), num_classes), 1.0 / num_classes, device=target.device)


def pt_target(teacher_probs: Tensor, target: Tensor) -> Tensor:
    """KD-pt (Sec. 4): the teacher's ground-truth mass only, the rest spread uniformly.

    .. math:: \\rho^{pt}_i = p^t_t \\text{ if } i = t, \\quad \\frac{1 - p^t_t}{K - 1} \\text{ otherwise.}

    Args:
        teacher_probs: ``(B, K)`` teacher distribution :math:`p^t` (at temperature ``T``).
        target: ``(B,)`` ground-truth classes.
    """
    num_classes = teacher_probs.shape[-1]
    p_true = teacher_probs.float().gather(1, target[:, None])
    rest = (1.0 - p_true) / (num_classes - 1)
    return rest.expand(-1, num_classes).scatter(1, target[:, None], p_true)


def topk_target(teacher_probs: Tensor, k: int) -> Tensor:
    """KD-topk (Sec. 5.3): the teacher's ``k`` largest probabilities kept, the remaining mass spread uniformly.

    .. math:: \\rho_i = p^t_i \\text{ if } i \\in \\mathrm{top}_k(p^t), \\quad
        \\frac{1 - \\sum_{j \\in \\mathrm{top}_k} p^t_j}{K - k} \\text{ otherwise.}

    Args:
        teacher_probs: ``(B, K)`` teacher distribution.
        k: number of kept probabilities, ``1 <= k < K``.

    Raises:
        ValueError: ``k`` out of range.
    """
    num_classes = teacher_probs.shape[-1]
    if not 1 <= k < num_classes:
        raise ValueError(f"topk needs 1 <= k < num_classes={num_classes}, got k={k}")
    probs = teacher_probs.float()
    top, index = probs.topk(k, dim=-1)
    rest = (1.0 - top.sum(-1, keepdim=True)).clamp_min(0.0) / (num_classes - k)
    return rest.expand(-1, num_classes).scatter(1, index, top)


def sim_table(classifier_weight: Tensor, power: float, temperature: float) -> Tensor:
    """KD-sim's class table (Sec. 4 and App. 7.2): a softmax over sharpened cosines of the teacher's class weights.

    .. math:: \\rho^{sim}_{t,:} = \\mathrm{softmax}\\Big(\\big(\\tfrac{1 + \\hat W \\hat w_t}{2}\\big)^{a} / b\\Big),

    with :math:`\\hat W` the L2-normalised rows of the teacher's last layer, :math:`a` = ``power`` and :math:`b` =
    ``temperature``. The text of App. 7.2 lost the formula; this form maps the cosines from [-1, 1] to [0, 1]
    (so that the power is defined and monotone), sharpens them with the power ("amplify the resolution of the
    cosine similarities") and softens with the temperature. ``power=1`` is the plain softmax of affine cosines.

    Args:
        classifier_weight: ``(K, D)`` teacher classifier weight (a bias is ignored).
        power: :math:`a > 0`.
        temperature: :math:`b > 0`.

    Returns:
        ``(K, K)`` float32 table; row ``t`` is the target of class ``t``.
    """
    if power <= 0 or temperature <= 0:
        raise ValueError(f"sim needs power > 0 and temperature > 0, got power={power}, temperature={temperature}")
    w = F.normalize(classifier_weight.detach().float(), dim=1)
    cosine = (w @ w.T).clamp(-1.0, 1.0)
    return (((1.0 + cosine) / 2.0) ** power / temperature).softmax(dim=-1)


def rel_table(superclass_map: Tensor, gt_mass: float, superclass_mass: float) -> Tensor:
    """KD-rel's class table (App. 8, Eq. 5): fixed masses for the ground truth, its super-class and the rest.

    .. math:: \\rho^{rel}_{t,i} = a \\text{ if } i = t, \\quad \\frac{b}{|S_t| - 1} \\text{ if } i \\in S_t
        \\setminus \\{t\\}, \\quad \\frac{1 - a - b}{K - |S_t|} \\text{ otherwise,}

    with :math:`S_t` the classes sharing t's super-class. The paper gives three per-class masses; here ``a`` and
    ``b`` are the masses of the ground truth and of all its siblings together, so every row sums to 1 whatever the
    super-class sizes.

    Args:
        superclass_map: ``(K,)`` super-class index of every class.
        gt_mass: :math:`a`.
        superclass_mass: :math:`b`; :math:`a, b \\ge 0`, :math:`a + b \\le 1`.

    Returns:
        ``(K, K)`` float32 table.

    Raises:
        ValueError: masses out of range, or a super-class of one class or of all classes (a mass would have
            nowhere to go).
    """
    if gt_mass < 0 or superclass_mass < 0 or gt_mass + superclass_mass > 1:
        raise ValueError(
            f"rel needs gt_mass >= 0, superclass_mass >= 0 and gt_mass + superclass_mass <= 1, got {gt_mass}, "
            f"{superclass_mass}"
        )
    same = superclass_map[:, None] == superclass_map[None, :]
    sizes = same.sum(1, keepdim=True)
    num_classes = len(superclass_map)
    if (sizes < 2).any() or (sizes == num_classes).any():
        raise ValueError(
            "rel needs every super-class to hold at least 2 classes and not all of them; got super-class sizes "
            f"{sorted(set(sizes.flatten().tolist()))} for {num_classes} classes"
        )
    sibling = superclass_mass / (sizes - 1).float()
    other = (1.0 - gt_mass - superclass_mass) / (num_classes - sizes).float()
    table = torch.where(same, sibling, other)
    return table.fill_diagonal_(gt_mass)


def table_target(table: Tensor, target: Tensor) -> Tensor:
    """Rows of a ``(K, K)`` class table for the labels ``(B,)``: ``(B, K)``."""
    return table[target]


def mix_targets(first: Tensor, second: Tensor, weight: float) -> Tensor:
    """Compounded partial KD (Sec. 4, "KD-pt+sim"): :math:`\\lambda\\rho^{1} + (1-\\lambda)\\rho^{2}`."""
    return weight * first + (1.0 - weight) * second


def teacher_distribution(
    kind: str,
    target: Tensor,
    num_classes: int,
    teacher_logits: Tensor | None = None,
    class_table: Tensor | None = None,
    temperature: float = 1.0,
    k: int = 5,
    pt_weight: float = 0.5,
    teacher_probs: Tensor | None = None,
) -> Tensor:
    """The ``(B, K)`` teacher distribution of ``kind`` (one of :data:`TARGET_KINDS`).

    Args:
        kind: the target kind.
        target: ``(B,)`` ground-truth classes.
        num_classes: ``K``.
        teacher_logits: ``(B, K)``; needed by :data:`TEACHER_FORWARD_KINDS`.
        class_table: ``(K, K)`` table of :func:`sim_table` or :func:`rel_table`; needed by :data:`TABLE_OF_KIND`.
        temperature: ``T`` of the teacher's softmax.
        k: kept probabilities of ``topk``.
        pt_weight: :math:`\\lambda` of ``pt+sim`` and ``pt+rel``.
        teacher_probs: ``(B, K)`` :math:`p^t` at ``temperature`` instead of ``teacher_logits`` (e.g. read from a
            teacher store).

    Raises:
        ValueError: unknown kind, or an input the kind needs is missing.
    """
    check_target_kind(kind)
    if kind in TEACHER_FORWARD_KINDS and teacher_logits is None and teacher_probs is None:
        raise ValueError(f"target kind {kind!r} needs the teacher's logits")
    if kind in TABLE_OF_KIND and class_table is None:
        raise ValueError(f"target kind {kind!r} needs the {TABLE_OF_KIND[kind]!r} class table")
    if kind == "ls":
        return uniform_target(target, num_classes)
    if kind in ("sim", "rel"):
        return table_target(class_table, target)
    probs = kd_target(teacher_logits, temperature) if teacher_probs is None else teacher_probs.float()
    if kind == "kd":
        return probs
    if kind == "topk":
        return topk_target(probs, k)
    pt = pt_target(probs, target)
    if kind == "pt":
        return pt
    return mix_targets(pt, table_target(class_table, target), pt_weight)


def gradient_rescaling(
    student_logits: Tensor, teacher_probs: Tensor, target: Tensor, alpha: float, temperature: float
) -> Tensor:
    """Per-example gradient rescaling factor of KD on the ground-truth logit (Eq. 3, Proposition 2, Fig. 2).

    The ratio of the ground-truth logit gradients of :math:`(1-\\alpha)\\mathrm{CE} + \\alpha T^2
    \\mathrm{KL}(\\rho\\,\\|\\,p_T)` and of plain CE, :math:`\\partial_{z_t} = (1-\\alpha)(p_t - 1) +
    \\alpha T (p_{T,t} - \\rho_t)` over :math:`p_t - 1`:

    .. math:: w_t = (1 - \\alpha) + \\alpha T \\frac{\\rho_t - p_{T,t}}{1 - p_t},

    with :math:`p = \\mathrm{softmax}(z)` and :math:`p_T = \\mathrm{softmax}(z / T)` the student's. With
    :math:`T = 1` and :math:`\\rho_t = p_t + c_t` this is Proposition 2's :math:`(1-\\alpha) + \\alpha c_t/(1-p_t)`:
    larger where the teacher is more confident.

    Args:
        student_logits: ``(B, K)``.
        teacher_probs: ``(B, K)`` distribution :math:`\\rho`.
        target: ``(B,)`` ground-truth classes.
        alpha: weight of the distillation term.
        temperature: ``T``.

    Returns:
        ``(B,)`` float32 factors.
    """
    z = student_logits.float()
    idx = target[:, None]
    p_true = z.softmax(-1).gather(1, idx).squeeze(1)
    p_true_t = (z / temperature).softmax(-1).gather(1, idx).squeeze(1)
    rho_true = teacher_probs.float().gather(1, idx).squeeze(1)
    return (1.0 - alpha) + alpha * temperature * (rho_true - p_true_t) / (1.0 - p_true)

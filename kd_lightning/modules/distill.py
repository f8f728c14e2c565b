"""DistillModule: a student trained from a frozen teacher with any target of Tang et al.'s partial-KD family.

:class:`KDStudentModule` is the loss and the targets, its teacher installed by :meth:`~KDStudentModule.set_teacher`
(the generations of :class:`~kd_lightning.GenerationModule` are its teachers); :class:`DistillModule` adds the
options that give it a teacher (a checkpoint, or a network from Python).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from kd_lightning.checkpoints import record_module, recorded
from kd_lightning.data.base import data_attribute
from kd_lightning.fused import SparseTargets, expand_sparse_targets, kd_loss_terms
from kd_lightning.losses import KDSettings
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.stored_teacher import StoredTeacher, split_stored_batch
from kd_lightning.modules.teacher import FrozenTeacher
from kd_lightning.modules.teacher_cache import TeacherOutputCache
from kd_lightning.targets import (
    TABLE_OF_KIND,
    TEACHER_FORWARD_KINDS,
    TargetKind,
    check_target_kind,
    kd_target,
    rel_table,
    sim_table,
    teacher_distribution,
)

__all__ = ["DistillModule", "KDStudentModule", "TeacherNetwork"]


class TeacherNetwork(Protocol):
    """The type of :class:`DistillModule`'s ``teacher``: an ``nn.Module`` whose ``forward`` gives the teacher's logits.

    A protocol rather than ``nn.Module`` for the command line's sake: ``--help`` names the option in one line instead
    of listing every ``torch.nn`` class. A teacher is passed from Python only (the command line and configs give
    ``teacher_backbone`` + ``teacher_checkpoint``, which also load its weights); it must be an ``nn.Module``.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The teacher's logits of a batch: ``(B, K)`` from ``(B, ...)`` inputs."""


class KDStudentModule(ClassifierModule):
    """KD (Hinton et al. 2015; Tang et al. 2020, Eq. 2): L = (1 - alpha) CE(z, y) + alpha T^2 KL(rho || softmax(z/T)).

    The loss of knowledge distillation (Hinton et al. 2015) and its partial variants (Tang et al. 2020), from the
    teacher that :meth:`set_teacher` installs (:class:`DistillModule` takes one as an option).

    The loss (Eq. 2 of Tang et al. with the :math:`T^2` of their App. 7.2, which ``t2_scaling=False`` drops), logged as
    ``train/ce`` and ``train/kd``:

    .. math:: \\mathcal{L} = (1-\\alpha)\\,\\mathrm{CE}(y, p^s) + \\alpha T^2\\,\\mathrm{KL}(\\rho \\,\\|\\, p^s_T),

    where :math:`\\rho` is the teacher distribution of ``target_kind`` (see :mod:`kd_lightning.targets`): ``kd``,
    ``ls``, ``pt``, ``sim``, ``pt+sim``, ``topk``, ``rel``, ``pt+rel``. Kinds that need no teacher output (``ls``,
    ``sim``, ``rel``) never run the teacher's forward; ``sim`` reads the teacher's classifier weights once (a
    ``K x K`` table), ``rel`` the datamodule's ``superclass_map`` at set-up. With no teacher and a kind that needs
    one, the module trains with cross-entropy only until :meth:`set_teacher` is called, and warns at fit start.

    Args:
        target_kind: the teacher distribution :math:`\\rho` (see :mod:`kd_lightning.targets`).
        alpha: :math:`\\alpha \\in [0, 1]`, weight of the distillation term.
        temperature: :math:`T > 0` of the student's (and the teacher's) softmax in the distillation term.
        t2_scaling: multiply the distillation term by :math:`T^2` (Hinton et al.; Tang et al. App. 7.2). Born-again
            and tolerant generations (Yang et al. Eq. 4) use none.
        topk: ``k`` of ``topk`` (``1 <= k < num_classes``).
        pt_weight: :math:`\\lambda` of ``pt+sim`` / ``pt+rel``: :math:`\\lambda\\rho^{pt} + (1-\\lambda)\\rho^{other}`.
        sim_power: power :math:`a` of ``sim`` (see :func:`~kd_lightning.targets.sim_table`).
        sim_temperature: softmax temperature :math:`b` of ``sim``.
        rel_gt_mass: ``rel``'s mass on the ground truth.
        rel_superclass_mass: ``rel``'s mass on the ground truth's super-class siblings, all together.
        cache_teacher_topk: deprecated (a FutureWarning; :class:`DistillModule`'s ``teacher_store`` replaces it, for
            augmented data and several devices too): cache the teacher's ``k`` largest probabilities of every training
            input during the first epoch and look them up afterwards instead of running the teacher (a
            :class:`~kd_lightning.modules.teacher_cache.TeacherOutputCache`; only for data without random
            augmentation, on one device; ``k = num_classes`` keeps the whole distribution). None: no cache.
        **kwargs: the student's :class:`ClassifierModule` arguments (``backbone``, ``num_classes``, ``optimizer`` ...).

    Raises:
        ValueError: an unknown ``target_kind`` or a hyperparameter out of range.
    """

    def __init__(
        self,
        target_kind: TargetKind = "kd",
        alpha: float = 0.9,
        temperature: float = 4.0,
        t2_scaling: bool = True,
        topk: int = 5,
        pt_weight: float = 0.5,
        sim_power: float = 1.0,
        sim_temperature: float = 0.1,
        rel_gt_mass: float = 0.6,
        rel_superclass_mass: float = 0.3,
        cache_teacher_topk: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_target_kind(target_kind)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        #: The loss's settings, from the hyperparameters (``temperature`` checked here): :math:`w_{CE} = 1 - \\alpha`,
        #: :math:`w_{KD} = \\alpha`.
        self.loss_settings = KDSettings(temperature, t2_scaling, self.label_smoothing, 1.0 - alpha, alpha)
        if target_kind == "topk" and not 1 <= topk < self.num_classes:
            raise ValueError(f"topk must be in [1, num_classes={self.num_classes}), got {topk}")
        if not 0.0 <= pt_weight <= 1.0:
            raise ValueError(f"pt_weight must be in [0, 1], got {pt_weight}")
        self.register_buffer("class_table", None, persistent=False)
        if cache_teacher_topk is not None:
            warnings.warn(
                "cache_teacher_topk is deprecated and will be removed in the next release: use DistillModule's "
                "teacher_store (the teacher's outputs written once, with augmentation, on any number of devices)",
                FutureWarning,
                stacklevel=3,
            )
        use_cache = cache_teacher_topk is not None and target_kind in TEACHER_FORWARD_KINDS
        self.teacher_cache = TeacherOutputCache(cache_teacher_topk) if use_cache else None

    # ------------------------------------------------------------------------------------------------ teacher
    @property
    def teacher(self) -> FrozenTeacher | None:
        """The frozen teacher, or None (held in :attr:`frozen`, outside the module tree)."""
        return self.frozen.first("teacher")

    def set_teacher(self, teacher: nn.Module | None, save: bool = False) -> None:
        """Installs (or removes) the teacher, frozen, on this module's device; ``save``: write its weights into
        checkpoints. ``sim`` reads its classifier weights now.

        Raises:
            ValueError: for ``sim``, a teacher classifier of another number of classes.
        """
        self.frozen.set("teacher", [] if teacher is None else [teacher], self.device, save)
        if TABLE_OF_KIND.get(self.hparams.target_kind) == "sim" and self.teacher is not None:
            weight = self.teacher.classifier_weight
            if weight.shape[0] != self.num_classes:
                raise ValueError(
                    f"the teacher's classifier has {weight.shape[0]} classes but the student has "
                    f"num_classes={self.num_classes}"
                )
            hp = self.hparams
            self.class_table = sim_table(weight, hp.sim_power, hp.sim_temperature).to(self.device)

    def uses_teacher(self) -> bool:
        """Whether the distillation term is on: a kind that needs no teacher, or a teacher installed."""
        return self.teacher is not None or self.hparams.target_kind in ("ls", "rel")

    # ----------------------------------------------------------------------------------------------- training
    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        if not self.uses_teacher():
            return {"ce": self.cross_entropy(self(x), y)}
        # The teacher runs before the student's forward: the other way round, its convolutions ran while the
        # student's activations were held for the backward pass, and the KD step took 1.18x the CE step plus the
        # teacher's forward instead of 1.02x (CPU, ResNet-20 pair; see the benchmark's kd row).
        targets = self.teacher_targets(x, y)
        ce, kd = kd_loss_terms(self(x), y, targets, self.loss_settings)
        return {"ce": ce, "kd": kd}

    def teacher_targets(self, x: Tensor, y: Tensor) -> Tensor:
        """``(B, K)`` float32 distribution :math:`\\rho` of the batch; the teacher runs only for kinds that need it."""
        teacher_logits = None
        if self.hparams.target_kind in TEACHER_FORWARD_KINDS:
            teacher_logits = self.teacher_logits(x) if self.teacher_cache is None else self._cached_teacher_logits(x)
        return self.targets_of(y, teacher_logits=teacher_logits)

    def targets_of(self, y: Tensor, **teacher_output: Tensor | None) -> Tensor:
        """:math:`\\rho` of the ``target_kind`` for the labels ``y`` and the teacher's ``teacher_logits`` or
        ``teacher_probs`` (:func:`~kd_lightning.targets.teacher_distribution`)."""
        hp = self.hparams
        return teacher_distribution(
            hp.target_kind,
            y,
            self.num_classes,
            class_table=self.class_table,
            temperature=self.loss_settings.temperature,
            k=hp.topk,
            pt_weight=hp.pt_weight,
            **teacher_output,
        )

    def teacher_logits(self, x: Tensor) -> Tensor:
        """The teacher's ``(B, K)`` logits of the inputs (a language model's teacher carries its hidden state)."""
        return self.teacher(x)

    def _cached_teacher_logits(self, x: Tensor) -> Tensor:
        """Teacher logits at temperature ``T`` rebuilt from the cache (``T * log p``: same softmax at ``T``)."""
        cache = self.teacher_cache
        if cache.ready:
            values, indices = cache.lookup(x)
        else:
            values, indices = cache.encode(kd_target(self.teacher_logits(x), self.loss_settings.temperature))
            cache.add(x, values, indices)
        return cache.decode(values, indices, self.num_classes).log() * self.loss_settings.temperature

    @override
    def on_train_epoch_end(self) -> None:
        if self.teacher_cache is not None and not self.teacher_cache.ready:
            self.teacher_cache.finalize()

    # ------------------------------------------------------------------------------------------------ set-up
    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if TABLE_OF_KIND.get(self.hparams.target_kind) == "rel":
            datamodule = getattr(self.trainer, "datamodule", None)
            superclass_map = data_attribute(datamodule, "superclass_map")
            if superclass_map is None:
                raise ValueError(
                    f"target_kind={self.hparams.target_kind!r} needs the datamodule's superclass_map (the super-class "
                    f"of every class), but {type(datamodule).__name__} has none: use a datamodule with super-classes "
                    "(SyntheticDataModule, CIFARDataModule with dataset='cifar100', FashionMNISTDataModule) or another "
                    "target_kind"
                )
            hp = self.hparams
            self.class_table = rel_table(superclass_map, hp.rel_gt_mass, hp.rel_superclass_mass).to(self.device)

    @override
    def on_fit_start(self) -> None:
        if not self.uses_teacher():
            rank_zero_warn(
                f"DistillModule(target_kind={self.hparams.target_kind!r}) has no teacher: it trains with cross-entropy "
                "only until set_teacher() is called"
            )


class DistillModule(KDStudentModule):
    """KD (Hinton et al. 2015; Tang et al. 2020, Eq. 2): L = (1 - alpha) CE(z, y) + alpha T^2 KL(rho || softmax(z/T)).

    Knowledge distillation from a frozen teacher: :class:`KDStudentModule`'s loss and a teacher option.

    The teacher is a :class:`~kd_lightning.modules.teacher.FrozenTeacher` (eval mode throughout, no gradients, not
    optimised) given either as ``teacher_backbone`` + ``teacher_checkpoint`` (recorded in the hyperparameters, so
    :func:`~kd_lightning.load_module` and ``fit --ckpt_path`` rebuild it from them alone) or as an ``nn.Module`` from
    Python (then loading a checkpoint needs ``teacher=`` again). Its weights stay out of the student's checkpoints
    unless ``save_teacher=True``.

    With ``teacher_store`` (Shen & Xing, ECCV 2022), the teacher runs once, at the start of the first ``fit`` naming
    the store, over ``store_draws`` recorded augmentation draws of every training sample (every rank its share); the
    student then trains on one stored view per sample and epoch (a choice seeded by the epoch: a resume picks the
    same) against the stored top-``store_topk`` targets, through :func:`~kd_lightning.fused.cross_entropy_and_kd`
    without expanding them. A store made for another teacher, temperature, dataset or augmentation is refused.

    Args:
        teacher: the teacher as an ``nn.Module`` (its logits from ``teacher(x)``), from Python only; exclusive with
            ``teacher_checkpoint``.
        teacher_backbone: registered backbone name of the teacher.
        teacher_checkpoint: path of the teacher's weights: a Lightning checkpoint of any kd_lightning module or a
            plain ``state_dict`` (see :meth:`FrozenTeacher.from_checkpoint`).
        teacher_backbone_kwargs: the teacher backbone's keyword arguments; None: those its checkpoint records.
        save_teacher: also write the teacher's weights into the student's checkpoints.
        teacher_store: folder of a teacher store (:mod:`kd_lightning.teacher_store`): the teacher's outputs on
            recorded views of every training sample, built at the start of the first fit that names it and read
            instead of running the teacher (kinds ``kd``, ``pt``, ``topk``, ``pt+sim``, ``pt+rel``). None: no store.
        store_draws: ``R``, the augmentation draws recorded per training sample.
        store_topk: ``k``, the teacher's probabilities stored per view (``num_classes`` or more: all of them).
        **kwargs: :class:`KDStudentModule`'s arguments (``target_kind``, ``alpha``, ``temperature`` ...) and
            :class:`ClassifierModule`'s (``backbone``, ``num_classes``, ``optimizer`` ...).

    Raises:
        ValueError: a teacher given twice or half given, a teacher checkpoint of another backbone / number of
            classes, ``teacher_store`` with a kind that needs no teacher output, with ``cache_teacher_topk`` or with
            ``store_topk`` out of range, and :class:`KDStudentModule`'s errors.
        TypeError: a ``teacher`` that is not an ``nn.Module``.
    """

    hparams_ignore: ClassVar[tuple[str, ...]] = (*ClassifierModule.hparams_ignore, "teacher")

    def __init__(
        self,
        teacher: TeacherNetwork | None = None,
        teacher_backbone: str | None = None,
        teacher_checkpoint: str | None = None,
        teacher_backbone_kwargs: dict[str, Any] | None = None,
        save_teacher: bool = False,
        teacher_store: str | None = None,
        store_draws: int = 4,
        store_topk: int = 10,
        **kwargs: Any,
    ) -> None:
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module (its logits from teacher(x)), got {type(teacher).__name__}")
        if teacher is not None and (teacher_backbone is not None or teacher_checkpoint is not None):
            raise ValueError("give the teacher either as an nn.Module or as teacher_backbone + teacher_checkpoint")
        if (teacher_backbone is None) != (teacher_checkpoint is None):
            raise ValueError(
                f"teacher_backbone and teacher_checkpoint go together, got teacher_backbone={teacher_backbone!r} "
                f"and teacher_checkpoint={teacher_checkpoint!r}"
            )
        super().__init__(**kwargs)
        #: Whether the teacher was given as a network from Python (a checkpoint cannot rebuild it).
        self.teacher_from_python = teacher is not None
        if teacher_checkpoint is not None:
            teacher = FrozenTeacher.from_checkpoint(
                teacher_backbone, self.num_classes, teacher_checkpoint, teacher_backbone_kwargs, self.build_backbone
            )
        super().set_teacher(teacher, save_teacher)
        #: The teacher store read instead of running the teacher (None: no store).
        self.stored_teacher = self._stored_teacher(teacher_store, store_draws, store_topk)

    def _stored_teacher(self, path: str | None, draws: int, topk: int) -> StoredTeacher | None:
        """The store of ``teacher_store``, its options checked against the module's.

        Raises:
            ValueError: see the class docstring.
        """
        if path is None:
            return None
        hp = self.hparams
        if hp.target_kind not in TEACHER_FORWARD_KINDS or hp.cache_teacher_topk is not None:
            raise ValueError(
                f"teacher_store stores the teacher's outputs: it serves the target kinds that read them "
                f"({', '.join(sorted(TEACHER_FORWARD_KINDS))}), without cache_teacher_topk; got "
                f"target_kind={hp.target_kind!r}, cache_teacher_topk={hp.cache_teacher_topk}"
            )
        if hp.target_kind == "topk" and topk < hp.topk:
            raise ValueError(f"target_kind 'topk' reads topk={hp.topk} entries: store_topk must be >= it, got {topk}")
        settings = self.loss_settings
        return StoredTeacher(path, draws, topk, settings.temperature, self.num_classes, self.store_teacher_logits)

    # ---------------------------------------------------------------------------------------- teacher store
    @override
    def configure_callbacks(self) -> list[Callback]:
        """The teacher store, which attaches itself to the datamodule and is built or checked at fit start."""
        return [] if self.stored_teacher is None else [self.stored_teacher]

    def store_teacher_logits(self) -> Callable[[Any], Tensor] | None:
        """The teacher's logits of a store build batch's inputs (one row per store row), or None for the default
        (the teacher on the flattened views, see :class:`~kd_lightning.modules.stored_teacher.StoredTeacher`); a
        language model's carries its state."""
        return None

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        """:class:`KDStudentModule`'s loss; on a teacher store's batch ``(x, y, rows)``, against the stored targets."""
        batch, rows = split_stored_batch(batch)
        if rows is None:
            return super().training_losses(batch)
        x, y = self.unpack_batch(batch)
        ce, kd = kd_loss_terms(self(x), y, self.stored_targets(y, rows), self.loss_settings)
        return {"ce": ce, "kd": kd}

    def stored_targets(self, y: Tensor, rows: Tensor) -> Tensor | SparseTargets:
        """:math:`\\rho` of the store's ``rows``: its sparse entries for ``kd`` and ``topk`` (never expanded), the
        dense rows of the other kinds."""
        kind = self.hparams.target_kind
        sparse = self.stored_teacher.targets(rows, self.hparams.topk if kind == "topk" else None)
        if kind in ("kd", "topk"):
            return sparse
        return self.targets_of(y, teacher_probs=expand_sparse_targets(*sparse, self.num_classes))

    def set_teacher(self, teacher: nn.Module | None, save: bool | None = None) -> None:
        """Installs (or removes) a teacher given as a network (the checkpoint options are cleared); ``save``: None
        keeps ``save_teacher``."""
        self.hparams["teacher_backbone"] = self.hparams["teacher_checkpoint"] = None
        self.teacher_from_python = teacher is not None
        super().set_teacher(teacher, self.hparams.save_teacher if save is None else save)

    # ------------------------------------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.teacher_from_python:
            record_module(checkpoint, self, teacher_source="object")

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Teacher weights saved with ``save_teacher=True`` replace those the hyperparameters rebuilt.

        Raises:
            ValueError: the checkpoint's teacher was given as a network, and none is given again.
        """
        super().on_load_checkpoint(checkpoint)
        if recorded(checkpoint, "teacher_source") == "object" and self.teacher is None:
            raise ValueError(
                "this DistillModule was trained with a teacher passed as an nn.Module, which its hyperparameters "
                "cannot rebuild: pass it again, e.g. load_module(path, teacher=teacher_net) or "
                "DistillModule.load_from_checkpoint(path, teacher=teacher_net) (or train with teacher_backbone + "
                "teacher_checkpoint)"
            )
        saved = self.frozen.saved_states(checkpoint, "teacher")
        if saved and self.teacher is not None:
            self.teacher.network.load_state_dict(saved[0])

"""GenerationModule: one network trained in generations (born-again networks, tolerant teachers), with its ancestors.

Yang et al. 2019, "Knowledge Distillation in Generations: More Tolerant Teachers Educate Better Students". The
:class:`~kd_lightning.GenerationalKD` callback drives the generations inside one ``fit``; this module holds what a
generation needs: its loss, the frozen networks of the finished generations (the last one is the teacher), the
ensembles they form, and per-generation metric names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from kd_lightning.losses import score_difference
from kd_lightning.models.registry import create_backbone, weights_loaded_later
from kd_lightning.modules.distill import KDStudentModule
from kd_lightning.modules.teacher import FrozenTeacher

__all__ = ["GenerationModule", "eta_from_confidence", "generation_metric_prefix"]


def eta_from_confidence(confidence: float, k: int = 5) -> float:
    """:math:`\\eta` of Eq. 3 of Yang et al. whose optimum puts the primary-class score at ``confidence``.

    Minimising :math:`-(1-\\eta)\\ln f_{a_1} + \\eta\\,[f_{a_1} - \\frac{1}{K-1}\\sum_{k\\ge2} f_{a_k}]` over
    distributions on the top-``K`` classes (:math:`f_{a_2} = \\dots = f_{a_K} = \\frac{1 - f_{a_1}}{K-1}`) gives
    :math:`f_{a_1} = \\frac{(K-1)(1-\\eta)}{K\\eta}` while that is below 1, hence

    .. math:: \\eta = \\frac{K-1}{K-1+K f_{a_1}^{(0)}}

    (the paper's :math:`\\mathcal{D}(0.6, \\cdot)` with :math:`K = 5`: :math:`\\eta = 4/7`). Every
    :math:`\\eta \\le \\frac{K-1}{2K-1}` has its optimum at :math:`f_{a_1} = 1`; ``confidence = 1`` (the paper's
    :math:`\\mathcal{D}(1.0, \\cdot)`: independent training, born-again networks) maps to the plain cross-entropy,
    :math:`\\eta = 0`.

    Raises:
        ValueError: ``k < 2``, or ``confidence`` outside ``[1/K, 1]`` (below ``1/K`` the primary class would not be the
            largest).
    """
    if k < 2:
        raise ValueError(f"the score difference needs K >= 2 classes, got k={k}")
    if not 1.0 / k <= confidence <= 1.0:
        raise ValueError(f"patriarch_confidence must be in [1/K, 1] = [{1.0 / k:.3f}, 1], got {confidence}")
    return 0.0 if confidence == 1.0 else (k - 1) / (k - 1 + k * confidence)


class GenerationModule(KDStudentModule):
    """Generations (Yang et al. 2019): gen 0 (1-eta) CE + eta (f_a1 - mean_{k>1} f_ak) (Eq. 3), gen g: Eq. 4 KD.

    A network of a sequence of generations: the patriarch (generation 0), then students of their predecessor.

    * Generation 0, the patriarch (Eq. 3 of Yang et al.), logged as ``train/ce`` and ``train/score_diff``:

      .. math:: \\mathcal{L}^{(0)} = (1-\\eta)\\,\\mathrm{CE}(y, f^{(0)})
          + \\eta\\,\\Big[f_{a_1}^{(0)} - \\frac{1}{K-1}\\sum_{k=2}^{K} f_{a_k}^{(0)}\\Big],

      with :math:`f` the softmax at temperature 1 and :math:`a_1..a_K` the model's own top-``K`` classes (see
      :func:`~kd_lightning.losses.score_difference`). Give :math:`\\eta` as ``patriarch_eta`` or through the paper's
      target confidence :math:`f_{a_1}^{(0)}` as ``patriarch_confidence`` (:func:`eta_from_confidence`); neither: plain
      cross-entropy.
    * Generation :math:`g \\ge 1` (Eq. 4), :class:`~kd_lightning.modules.distill.KDStudentModule`'s loss with the
      frozen generation :math:`g-1` as teacher:
      :math:`(1-\\lambda)\\,\\mathrm{CE}(y, f^{(g)}) + \\lambda\\,\\mathrm{KL}(f^{(g-1)} \\,\\|\\, f^{(g)})`,
      :math:`\\lambda` = ``alpha``, at ``temperature`` 1 and without :math:`T^2` by default (the paper's form; other
      temperatures and target kinds of the KD family are options). The paper's :math:`\\mathcal{D}(f_{a_1}^{(0)},
      \\lambda)`: ``D(1.0, 0.0)`` is independent training, ``D(1.0, 0.5)`` born-again networks, ``D(0.6, 0.6)`` the
      tolerant teacher.

    :meth:`start_next_generation` (called by :class:`~kd_lightning.GenerationalKD` at each boundary) freezes the
    current network as the new teacher and re-initialises this one in place from a seed. The finished generations'
    weights are saved in checkpoints and restored with them (a run resumes in its generation, and
    :func:`~kd_lightning.load_module` / ``kd-lightning test --ckpt_path`` evaluate every generation).

    Evaluation: validation logs under ``val/gen<g>/`` (``acc1``, ``acc5``, ``loss``, ``confidence`` = the mean
    primary-class score :math:`f_{a_1}`, the paper's "energy"; and ``ensemble/acc1``...), so checkpointing and early
    stopping never compare two generations; the test logs ``test/acc1`` (this generation), ``test/ensemble/acc1``
    (all generations), and ``test/gen<g>/...`` and ``test/ensemble<g>/...`` for every finished generation ``g``. An
    ensemble averages the members' softmax probabilities (its output is their log); it starts from the patriarch, or
    from generation 1 with ``ensemble_includes_patriarch=False``.

    Args:
        patriarch_confidence: :math:`f_{a_1}^{(0)}` in ``[1/K, 1]``; exclusive with ``patriarch_eta``.
        patriarch_eta: :math:`\\eta \\in [0, 1)` of Eq. 3.
        score_topk: ``K`` of Eq. 3 (5 in the paper), ``2 <= K <= num_classes``.
        ensemble_includes_patriarch: the ensembles include generation 0 (the "+Ensemble" rows of Tables 1-2 do).
        alpha: :math:`\\lambda` of Eq. 4.
        temperature: of Eq. 4's KL (1 in the paper).
        t2_scaling: multiply Eq. 4's KL by :math:`T^2` (not in the paper).
        **kwargs: :class:`~kd_lightning.modules.distill.KDStudentModule`'s other arguments (``target_kind`` ...)
            and :class:`ClassifierModule`'s (``backbone``, ``num_classes``, ``optimizer`` ...). The teachers are the
            module's own generations.

    Raises:
        ValueError: both or invalid ``patriarch_*``, or ``score_topk`` out of range.
    """

    def __init__(
        self,
        patriarch_confidence: float | None = None,
        patriarch_eta: float | None = None,
        score_topk: int = 5,
        ensemble_includes_patriarch: bool = True,
        alpha: float = 0.6,
        temperature: float = 1.0,
        t2_scaling: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(alpha=alpha, temperature=temperature, t2_scaling=t2_scaling, **kwargs)
        if patriarch_confidence is not None and patriarch_eta is not None:
            raise ValueError("give the patriarch's tolerance as patriarch_confidence or as patriarch_eta, not both")
        if not 2 <= score_topk <= self.num_classes:
            raise ValueError(f"score_topk must be in [2, num_classes={self.num_classes}], got {score_topk}")
        if patriarch_eta is not None and not 0.0 <= patriarch_eta < 1.0:
            raise ValueError(f"patriarch_eta must be in [0, 1), got {patriarch_eta}")
        if patriarch_confidence is not None:
            patriarch_eta = eta_from_confidence(patriarch_confidence, score_topk)
        self.eta = patriarch_eta or 0.0
        #: Epochs of one generation (set by GenerationalKD): the default cosine schedule's length.
        self.generation_epochs: int | None = None

    # ------------------------------------------------------------------------------------------- generations
    @property
    def generation(self) -> int:
        """Index of the generation being trained: 0 for the patriarch."""
        return len(self.finished)

    @property
    def finished(self) -> tuple[FrozenTeacher, ...]:
        """The frozen networks of generations ``0 .. generation - 1``; the last is the teacher."""
        return self.frozen.get("generations")

    def fresh_backbone(self, seed: int | None = None) -> nn.Module:
        """A newly initialised backbone of this module's architecture, from ``seed`` (the global RNG is untouched),
        on this module's device and dtype; with a seed, a pretrained backbone restarts from its pretrained weights,
        without one it is built only to receive weights (none are loaded)."""
        hp = self.hparams
        # Without a seed the network is a container for weights loaded next: no pretrained weights are read.
        with torch.random.fork_rng(devices=[]), nullcontext() if seed is not None else weights_loaded_later():
            if seed is not None:
                torch.manual_seed(seed)
            network = create_backbone(hp.backbone, self.num_classes, **(hp.backbone_kwargs or {}))
        reference = next(self.backbone.parameters())
        network.to(device=reference.device, dtype=reference.dtype)
        if hp.channels_last:
            network.to(memory_format=torch.channels_last)
        return network

    def start_next_generation(self, seed: int) -> None:
        """Freeze the current network as the next generation's teacher; re-initialise this one in place.

        The new weights (and batch-norm statistics) are those of a freshly built backbone seeded by ``seed``, copied
        into the existing parameters, so optimizers rebuilt afterwards and a DDP wrapper keep working. The same seed on
        every rank gives the same weights on every rank. The re-initialised network is put in train mode.
        """
        snapshot = self.fresh_backbone()
        snapshot.load_state_dict(self.backbone.state_dict())
        self._adopt_finished((*self.finished, snapshot))
        self.backbone.load_state_dict(self.fresh_backbone(seed).state_dict())
        self.backbone.train()

    def _adopt_finished(self, finished: Sequence[nn.Module]) -> None:
        """The finished generations (saved in checkpoints) and the last of them as the teacher."""
        finished = self.frozen.set("generations", finished, self.device, save=True)
        self.set_teacher(finished[-1] if finished else None)
        if self.teacher_cache is not None:  # the cached outputs were the previous teacher's
            self.teacher_cache = type(self.teacher_cache)(self.teacher_cache.k, self.teacher_cache.seed)

    # ----------------------------------------------------------------------------------------------- training
    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        if self.generation > 0:
            return super().training_losses(batch)
        x, y = self.unpack_batch(batch)
        logits = self(x)
        ce = self.cross_entropy(logits, y)
        if self.eta == 0.0:
            return {"ce": ce}
        return {"ce": (1.0 - self.eta) * ce, "score_diff": self.eta * score_difference(logits, self.hparams.score_topk)}

    def schedule_length(self) -> int:
        """One generation's epochs (each generation restarts the schedule), unless ``schedule_epochs`` is set."""
        if self.hparams.schedule_epochs is None and self.generation_epochs is not None:
            return self.generation_epochs
        return super().schedule_length()

    @override
    def on_fit_start(self) -> None:
        """No warning for the patriarch's missing teacher (KDStudentModule's): generation 0 has none by design."""

    # --------------------------------------------------------------------------------------------- evaluation
    def eval_log_prefix(self, stage: str) -> str:
        """:func:`generation_metric_prefix` of the current generation."""
        return generation_metric_prefix(stage, self.generation, self.generation)

    def eval_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """``main`` and ``ensemble`` (of generations 0..g, when it has two members or more); in a test, also
        ``gen<j>`` and ``ensemble<j>`` of every finished generation ``j``."""
        logits = [*(network(x) for network in self.finished), self(x)]
        log_probs = [z.float().log_softmax(dim=-1) for z in logits]
        start = 0 if self.hparams.ensemble_includes_patriarch else 1
        testing = self._trainer is not None and self.trainer.testing
        outputs = {"main": logits[-1]}
        for g, z in enumerate(logits):
            last = g == len(logits) - 1
            if testing and not last:
                outputs[_output_name(g, last, ensemble=False)] = z
            if g - start >= 1 and (testing or last):
                members = torch.stack(log_probs[start : g + 1])
                outputs[_output_name(g, last, ensemble=True)] = members.logsumexp(dim=0) - math.log(len(members))
        return outputs

    def eval_extra_metrics(self, outputs: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """``confidence``: the mean primary-class score :math:`f_{a_1}` of each single network."""
        singles = {name: z for name, z in outputs.items() if name == "main" or name.startswith("gen")}
        return {
            ("confidence" if name == "main" else f"{name}/confidence"): z.float().softmax(dim=-1).amax(dim=-1).mean()
            for name, z in singles.items()
        }

    # ------------------------------------------------------------------------------------------- checkpoints
    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The finished generations saved in the checkpoint, and the last of them as the teacher."""
        super().on_load_checkpoint(checkpoint)
        finished = []
        for state in self.frozen.saved_states(checkpoint, "generations"):
            network = self.fresh_backbone()
            network.load_state_dict(state)
            finished.append(network)
        self._adopt_finished(finished)


def generation_metric_prefix(stage: str, generation: int, current: int, ensemble: bool = False) -> str:
    """Where a :class:`GenerationModule` logs the metrics of generation ``generation`` (``ensemble``: of the ensemble
    of the generations up to it) in ``stage`` (``"val"``, ``"test"``), generation ``current`` being the one trained.

    Validation logs the current generation under ``val/gen<g>/`` (its ensemble under ``val/gen<g>/ensemble/``); a
    test logs the current generation under ``test/`` (``test/ensemble/``) and every finished generation ``j`` under
    ``test/gen<j>/`` (``test/ensemble<j>/``). The one source of these names for the module and for
    :class:`~kd_lightning.callbacks.GenerationalKD`'s tables.
    """
    if stage == "val" or generation == current:
        base = f"{stage}/gen{generation}/" if stage == "val" else f"{stage}/"
        return f"{base}ensemble/" if ensemble else base
    return f"{stage}/{_output_name(generation, False, ensemble)}/"


def _output_name(generation: int, current: bool, ensemble: bool) -> str:
    """The name of an evaluation output (the current generation's first output is ``main``, logged at the prefix
    itself)."""
    if current:
        return "ensemble" if ensemble else "main"
    return f"ensemble{generation}" if ensemble else f"gen{generation}"

"""``kd-lightning fit --model.help <module>``: short, every option described, documented choices listed."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
from unittest import mock

import lightning.pytorch as pl
import pytest
from torch import nn

import kd_lightning
from kd_lightning import DistillModule
from kd_lightning.cli import main
from kd_lightning.modules.okddip import AGGREGATE_SPACES, AGGREGATIONS
from kd_lightning.modules.self_distill import BATCH_STATS, TERMS
from kd_lightning.targets import TARGET_KINDS
from tests.helpers import tiny_mlp_kwargs

MODULES = sorted(
    name
    for name in kd_lightning.__all__
    if isinstance(getattr(kd_lightning, name), type) and issubclass(getattr(kd_lightning, name), pl.LightningModule)
)
#: (module, option, its documented values).
CHOICES = [
    ("DistillModule", "target_kind", TARGET_KINDS),
    ("GenerationModule", "target_kind", TARGET_KINDS),
    ("LanguageModelDistillModule", "target_kind", TARGET_KINDS),
    ("OKDDipModule", "aggregation", AGGREGATIONS),
    ("OKDDipModule", "aggregate", AGGREGATE_SPACES),
    ("SelfDistillModule", "terms", TERMS),
    ("SelfDistillModule", "batch_stats", BATCH_STATS),
]


@functools.cache
def model_help(name: str) -> str:
    """What ``kd-lightning fit --model.help kd_lightning.<name>`` prints in an 80-column terminal."""
    out = io.StringIO()
    columns = mock.patch.dict(os.environ, {"COLUMNS": "80"})
    with columns, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", f"kd_lightning.{name}"])
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def options(help_text: str) -> dict[str, tuple[str, str]]:
    """Each ``--model.<option>`` of a help text (``.help`` entries left out) -> its metavar and its description,
    without the ``(type: ..., default: ...)`` part."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in help_text.split("Help for --model.help=", 1)[1].splitlines():
        match = re.match(r"  --model\.(\S+)(.*)", line)
        if match:
            current = None if match[1].endswith(".help") else match[1]
            if current is not None:
                entries[current] = re.split(r"\s{2,}", match[2].strip(), maxsplit=1)
        elif current is not None and line.startswith(" " * 24):
            entries[current].append(line.strip())
    return {name: (metavar, " ".join(text).split("(type:", 1)[0].strip()) for name, (metavar, *text) in entries.items()}


@pytest.mark.parametrize("name", MODULES)
def test_help_is_short_and_every_option_is_described(name):
    text = model_help(name)
    assert len(text.splitlines()) < 200  # no option lists every torch.nn class
    entries = options(text)
    assert entries, "no option found: has the help format changed?"
    undescribed = [option for option, (_, description) in entries.items() if not description]
    assert not undescribed, f"{name}: options without a description in --model.help: {undescribed}"


@pytest.mark.parametrize("name", ["DistillModule", "LanguageModelDistillModule"])
def test_teacher_option_is_named_without_the_torch_nn_classes(name):
    assert "teacher" in options(model_help(name))
    assert "torch.nn.Linear" not in model_help(name)


@pytest.mark.parametrize(("name", "option", "values"), CHOICES, ids=[f"{m}.{o}" for m, o, _ in CHOICES])
def test_documented_choices_are_listed(name, option, values):
    assert options(model_help(name))[option][0] == "{" + ",".join(values) + "}"


def test_a_teacher_is_still_a_module_from_python():
    net = nn.Linear(tiny_mlp_kwargs()["backbone_kwargs"]["in_features"], tiny_mlp_kwargs()["num_classes"])
    assert DistillModule(teacher=net, **tiny_mlp_kwargs()).teacher.network is net
    with pytest.raises(
        TypeError, match=r"teacher must be an nn\.Module \(its logits from teacher\(x\)\), got function"
    ):
        DistillModule(teacher=lambda x: x, **tiny_mlp_kwargs())

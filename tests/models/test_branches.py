"""StudentGroup: what the branches share, independent initialisation, export, gradient scaling, errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.models import StudentGroup, create_backbone, list_backbones
from kd_lightning.models.branches import default_shared_stages, scale_gradient
from kd_lightning.models.registry import _REGISTRY

#: One small backbone of every backbone module (family); the test below checks that no family is missing. ResNeXt's
#: only network (10 s per test here) is a ``CifarResNet``, the class of ``resnet20``.
FAMILIES = ["resnet20", "densenet_bc40_12", "vgg16", "mlp", "preact_resnet18", "wrn_16_2", "resnet18"]
SAME_CLASS_AS_A_FAMILY = {"kd_lightning.models.resnext"}
MLP_KWARGS = {"in_features": 16, "hidden": 32}


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _input(group: StudentGroup, batch: int = 2) -> torch.Tensor:
    shape = group.input_shape
    if len(shape) == 3:
        shape = (shape[0], min(shape[1], 64), min(shape[2], 64))
    return torch.randn(batch, *shape)


def test_families_cover_every_backbone_module():
    modules = {_REGISTRY[name].__module__ for name in list_backbones()} - SAME_CLASS_AS_A_FAMILY
    assert {_REGISTRY[name].__module__ for name in FAMILIES} == modules


def test_branch_group_shares_exactly_the_trunk():
    torch.manual_seed(0)
    group = StudentGroup("resnet20", 10, 3, shared_stages=2)
    reference = create_backbone("resnet20", 10)
    trunk = _ids(group.trunk.parameters())
    n_trunk = sum(p.numel() for m in (reference.stem, *reference.stages[:2]) for p in m.parameters())
    assert sum(p.numel() for p in group.trunk.parameters()) == n_trunk
    students = [_ids(s.parameters()) for s in group.students]
    for i in range(3):
        assert not students[i] & trunk
        for j in range(i + 1, 3):
            assert not students[i] & students[j]  # each student's own part is its own
    # the parameters a student uses are the trunk's plus its own: a CE on student 1 reaches exactly those
    x = torch.randn(2, 3, 32, 32)
    F.cross_entropy(group.student_logits(x, 1), torch.tensor([0, 1])).backward()
    reached = {id(p) for p in group.parameters() if p.grad is not None}
    assert reached == trunk | students[1]
    n_branch = sum(
        p.numel() for m in (reference.stages[2], reference.head, reference.classifier) for p in m.parameters()
    )
    assert sum(p.numel() for p in group.parameters()) == n_trunk + 3 * n_branch


def test_default_split_and_network_based():
    torch.manual_seed(0)
    backbone = create_backbone("resnet20", 10)
    assert default_shared_stages(backbone) == 2  # all stages but the last, the CIFAR split of ONE / OKDDip
    stem_only = StudentGroup("resnet20", 10, 2, shared_stages=0)
    assert len(stem_only.trunk) == 1 and all(len(s.stages) == 3 for s in stem_only.students)
    networks = StudentGroup("resnet20", 10, 2, shared_stages=None)
    assert networks.trunk is None
    assert not _ids(networks.students[0].parameters()) & _ids(networks.students[1].parameters())
    assert sum(p.numel() for p in networks.parameters()) == 2 * sum(p.numel() for p in backbone.parameters())


def test_students_are_initialised_independently():
    torch.manual_seed(0)
    group = StudentGroup("resnet20", 10, 2, shared_stages=2)
    first, second = (dict(s.named_parameters()) for s in group.students)
    conv = "stages.0.0.residual.0.0.weight"
    assert first[conv].shape == second[conv].shape and not torch.equal(first[conv], second[conv])
    assert not torch.equal(first["classifier.weight"], second["classifier.weight"])


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("network_based", [False, True], ids=["branches", "networks"])
def test_export_is_the_student_as_a_plain_backbone(name, network_based):
    torch.manual_seed(0)
    kwargs = MLP_KWARGS if name == "mlp" else {}
    group = StudentGroup(name, 5, 2, None if network_based else 1, kwargs).eval()
    x = _input(group)
    state = torch.random.get_rng_state()
    exported = group.export(1).eval()
    assert torch.equal(torch.random.get_rng_state(), state)  # export leaves the caller's RNG alone
    assert type(exported) is type(create_backbone(name, 5, **kwargs))
    assert exported.state_dict().keys() == create_backbone(name, 5, **kwargs).state_dict().keys()
    with torch.no_grad():
        output = group(x)
        assert output.logits.shape == (2, 2, 5) and output.features.shape == (2, 2, group.num_features)
        assert torch.allclose(exported(x), output.logits[1], atol=1e-5)
        assert torch.allclose(group.student_logits(x, 1), output.logits[1], atol=1e-5)
    exported.classifier.weight.data.zero_()  # a copy: the group is untouched
    assert group.students[1].classifier.weight.abs().sum() > 0


def test_scale_gradient():
    x = torch.ones(3, requires_grad=True)
    y = scale_gradient(x, 0.25)
    (2 * y).sum().backward()
    assert torch.equal(y, x) and torch.allclose(x.grad, torch.full((3,), 0.5))


def test_trunk_width():
    torch.manual_seed(0)
    assert StudentGroup("resnet20", 10, 2, shared_stages=2).trunk_width() == 32
    assert StudentGroup("mlp", 10, 2, shared_stages=1, backbone_kwargs=MLP_KWARGS).trunk_width() == 32


def test_errors():
    with pytest.raises(ValueError, match=r"num_students must be >= 1, got 0"):
        StudentGroup("resnet20", 10, 0, shared_stages=2)
    with pytest.raises(ValueError, match=r"shared_stages must be in \[0, 2\] for backbone 'resnet20' \(3 stages"):
        StudentGroup("resnet20", 10, 2, shared_stages=3)
    with pytest.raises(IndexError, match=r"student index 2 out of range for 2 students"):
        StudentGroup("resnet20", 10, 2, shared_stages=2).export(2)

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.data import SyntheticDataModule

SMALL = {"num_train": 600, "num_val": 100, "num_test": 200, "batch_size": 64}


def test_deterministic_for_a_data_seed_whatever_the_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    a = SyntheticDataModule(**SMALL)
    a.setup()
    torch.manual_seed(1)
    np.random.seed(1)
    b = SyntheticDataModule(**SMALL)
    b.setup()
    for name in ("train_set", "val_set", "test_set"):
        xa, ya = next(iter(a._loader(getattr(a, name), train=False)))
        xb, yb = next(iter(b._loader(getattr(b, name), train=False)))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = SyntheticDataModule(**SMALL, data_seed=2)
    assert not torch.equal(a.class_vectors, c.class_vectors)
    assert not torch.equal(a.generate(10, 3)[0], c.generate(10, 3)[0])


def test_shapes_and_sizes():
    dm = SyntheticDataModule(**SMALL)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (600, 100, 200)
    assert dm.input_shape == (32,) and dm.num_classes == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 32) and x.dtype == torch.float32 and y.dtype == torch.long


def test_test_set_does_not_depend_on_the_training_size():
    small, large = SyntheticDataModule(**SMALL), SyntheticDataModule(**{**SMALL, "num_train": 900})
    small.setup("test")
    large.setup("test")
    assert torch.equal(small.test_set.dataset.tensors[0], large.test_set.dataset.tensors[0])


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.9, 1.0])
def test_geometry(tau):
    dm = SyntheticDataModule(num_classes=12, num_superclasses=3, input_dim=20, class_similarity=tau)
    e, w = dm.basis, dm.class_vectors
    assert e.shape == (3, 20) and w.shape == (12, 20)
    torch.testing.assert_close(e @ e.T, torch.eye(3, dtype=torch.float64))  # orthonormal basis
    torch.testing.assert_close(w.norm(dim=1), torch.ones(12, dtype=torch.float64))  # unit class vectors
    cos_basis = w @ e.T  # (12, 3): tau with the own super-class's basis vector, 0 with the others
    own = dm.superclass_map
    expected = torch.zeros(12, 3, dtype=torch.float64)
    expected[torch.arange(12), own] = tau
    torch.testing.assert_close(cos_basis, expected)
    same = own[:, None] == own[None, :]
    cos_classes = w @ w.T
    pairs = same & ~torch.eye(12, dtype=torch.bool)  # two classes of one super-class
    torch.testing.assert_close(cos_classes[pairs], torch.full((36,), tau**2, dtype=torch.float64))
    torch.testing.assert_close(cos_classes[~same], torch.zeros(int((~same).sum())).double())


def test_superclass_map():
    dm = SyntheticDataModule(num_classes=12, num_superclasses=3, input_dim=20)
    assert dm.superclass_map.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert dm.num_superclasses == 3


def test_label_rule_against_numpy():
    dm = SyntheticDataModule(**SMALL)
    dm.setup("test")
    x, y = dm.test_set.dataset.tensors
    xs, w = x[:20].double().numpy(), dm.class_vectors.numpy()
    a, b = dm.frequencies.numpy(), dm.phases.numpy()
    expected = []
    for point in xs:
        scores = [
            w_c @ point + sum(np.sin(a_i * (w_c @ point) + b_i) for a_i, b_i in zip(a, b, strict=True)) for w_c in w
        ]
        expected.append(int(np.argmax(scores)))
    assert y[:20].tolist() == expected
    assert len(a) == dm.difficulty == 4 and np.all((a >= 0.5) & (a <= 1.5)) and np.all((b >= 0) & (b < 2 * np.pi))


def test_difficulty_zero_is_the_linear_rule_and_terms_are_nested():
    linear = SyntheticDataModule(**SMALL, difficulty=0)
    x, y = linear.generate(500, 2)
    assert torch.equal(y, (x.double() @ linear.class_vectors.T).argmax(1))
    two, four = SyntheticDataModule(difficulty=2), SyntheticDataModule(difficulty=4)
    assert torch.equal(two.frequencies, four.frequencies[:2]) and torch.equal(two.phases, four.phases[:2])


def test_default_task_is_far_from_linear_and_balanced():
    dm = SyntheticDataModule(num_train=4000, num_val=0)
    x, y = dm.generate(4000, 2)
    counts = torch.bincount(y, minlength=dm.num_classes)
    assert counts.min() > 0.7 * 4000 / dm.num_classes  # every class present, none degenerate
    agreement = (y == (x.double() @ dm.class_vectors.T).argmax(1)).float().mean()
    assert agreement < 0.6  # the sine terms change most labels of the linear rule


def test_every_class_present_for_other_settings():
    dm = SyntheticDataModule(num_classes=20, num_superclasses=5, input_dim=64, data_seed=0, **SMALL)
    dm.setup("fit")
    assert torch.bincount(dm.train_set.dataset.tensors[1], minlength=20).min() > 0


def test_errors():
    with pytest.raises(ValueError, match="views=2 is not meaningful for SyntheticDataModule"):
        SyntheticDataModule(views=2)
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        SyntheticDataModule(num_classes=1, num_superclasses=1)
    with pytest.raises(ValueError, match="num_superclasses must be >= 1 and divide num_classes, got 3 for 10"):
        SyntheticDataModule(num_superclasses=3)
    with pytest.raises(ValueError, match="num_superclasses must be >= 1 and divide num_classes, got 0 for 10"):
        SyntheticDataModule(num_superclasses=0)
    with pytest.raises(ValueError, match=r"input_dim must be >= num_classes \+ num_superclasses = 12 .* got 11"):
        SyntheticDataModule(input_dim=11)
    with pytest.raises(ValueError, match=r"class_similarity must be in \[0, 1\], got 1.5"):
        SyntheticDataModule(class_similarity=1.5)
    with pytest.raises(ValueError, match=r"class_similarity must be in \[0, 1\], got -0.1"):
        SyntheticDataModule(class_similarity=-0.1)
    with pytest.raises(ValueError, match=r"difficulty \(the number of sine terms\) must be >= 0, got -1"):
        SyntheticDataModule(difficulty=-1)
    with pytest.raises(ValueError, match="frequency_scale must be >= 0, got -1"):
        SyntheticDataModule(frequency_scale=-1)
    with pytest.raises(ValueError, match="num_train and num_test must be >= 1 and num_val >= 0, got 0, 10000, 5000"):
        SyntheticDataModule(num_train=0)
    with pytest.raises(ValueError, match="num_train and num_test must be >= 1 and num_val >= 0, got 50000, 10000, -1"):
        SyntheticDataModule(num_val=-1)
    with pytest.raises(ValueError, match="data_seed must be >= 0, got -1"):
        SyntheticDataModule(data_seed=-1)


def test_views_is_deprecated_and_single():
    assert SyntheticDataModule(num_train=8, num_val=0, num_test=8).views == 1
    with pytest.warns(FutureWarning, match="SyntheticDataModule's views is deprecated .*remove it from the config"):
        assert SyntheticDataModule(views=1).views == 1

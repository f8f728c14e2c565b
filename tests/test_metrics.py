"""Plain measurements against hand-computed values."""

import math

import pytest
import torch

from kd_lightning.metrics import peer_diversity


def test_peer_diversity_by_hand():
    two = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # (1/2, 1/2) vs (3/4, 1/4)
    assert peer_diversity(two).item() == pytest.approx(math.sqrt(2 * 0.25**2), rel=1e-6)
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(5))
    probs = logits.softmax(-1)
    pairs = [(probs[i] - probs[j]).norm(dim=-1).mean() for i in range(3) for j in range(i + 1, 3)]
    assert peer_diversity(logits).item() == pytest.approx(sum(pairs).item() / 3, rel=1e-5)
    assert peer_diversity(logits[:1].expand(2, -1, -1)).item() == 0.0

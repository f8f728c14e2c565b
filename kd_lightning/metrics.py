"""Plain measurements of a model's outputs (not losses): tensors in, a number out."""

from __future__ import annotations

from torch import Tensor

__all__ = ["peer_diversity"]


def peer_diversity(logits: Tensor) -> Tensor:
    """Peer diversity of OKDDip (Fig. 4): mean Euclidean distance between two peers' predictions.

    .. math:: D = \\frac{2}{n(n-1)B} \\sum_b \\sum_{i<j} \\big\\| \\mathrm{softmax}(z_{ib}) - \\mathrm{softmax}(z_{jb})
        \\big\\|_2

    (The authors' code divides the sum over pairs by 3, the number of pairs of its 3 peers.)

    Args:
        logits: ``(n, B, C)`` logits of ``n >= 2`` peers.
    """
    probs = logits.float().softmax(dim=-1)
    n, batch, _ = probs.shape
    total = sum((probs[i + 1 :] - probs[i]).norm(dim=-1).sum() for i in range(n - 1))  # peers i < j, no (n, n, B, C)
    return total * 2 / (n * (n - 1) * batch)

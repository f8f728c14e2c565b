"""Tiny Penn Treebank files in the real format (one sentence per line, words separated by spaces, `<unk>`, `N`)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "<unk>", "N", "of", "a", "market", "said", "shares", "in", "to", "company", "mr.", "year", "rose"]


def write_ptb(root: Path, lines: tuple[int, int, int] = (120, 30, 30), seed: int = 0) -> Path:
    """Write ``ptb.{train,valid,test}.txt`` with the given numbers of random sentences under ``root``.

    Every word of :data:`WORDS` is in the training file's first line, so valid/test use no unseen word.
    """
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for split, count in zip(("train", "valid", "test"), lines, strict=True):
        sentences = [" ".join(WORDS)] if split == "train" else []
        while len(sentences) < count:
            length = int(torch.randint(3, 12, (1,), generator=generator))
            ids = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
            sentences.append(" ".join(WORDS[i] for i in ids))
        (root / f"ptb.{split}.txt").write_text("".join(f" {s} \n" for s in sentences))
    return root

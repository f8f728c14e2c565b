"""One run per folder: where ``kd-lightning fit`` writes a run's files, and the rule that keeps them one run's.

A run's folder is ``trainer.default_root_dir`` (the working directory when unset) and holds::

    config.yaml               the full configuration of the run (LightningCLI)
    checkpoints/last.ckpt     the latest epoch (a link to checkpoints/epoch=E-step=S.ckpt), and any best-k files
    events.out.tfevents.*     TensorBoard logs (metrics.csv + hparams.yaml with the CSV logger)
    summary.json              the final metrics, written when the run finishes

A second ``fit`` into a folder that holds a run is refused unless it resumes that run (``--ckpt_path last`` or a
checkpoint of that folder) or asks to replace it (``--overwrite true``), so ``<folder>/checkpoints/last.ckpt``, the
path the students' configs read their teacher from, always belongs to the run that ``config.yaml`` describes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SUMMARY_FILE", "RunFolder", "RunFolderError", "write_summary"]

SUMMARY_FILE = "summary.json"
#: The files a run writes at the top of its folder (the checkpoints are under ``checkpoint_dir``).
RUN_FILES = ("config.yaml", "hparams.yaml", "metrics.csv", SUMMARY_FILE)
LOG_PATTERN = "events.out.tfevents.*"
LAST = "last.ckpt"


class RunFolderError(ValueError):
    """A ``fit`` would mix its files with those of another run."""


@dataclass(frozen=True)
class RunFolder:
    """The folder of one run and the folder of its checkpoints.

    Args:
        root: ``trainer.default_root_dir``.
        checkpoint_dir: ``checkpoint.dirpath``, by default ``root/checkpoints``.
    """

    root: Path
    checkpoint_dir: Path

    @classmethod
    def of(cls, default_root_dir: str | os.PathLike | None, checkpoint_dirpath: str | os.PathLike | None) -> RunFolder:
        """The run folder of a config's ``trainer.default_root_dir`` and ``checkpoint.dirpath``."""
        root = Path(default_root_dir or os.getcwd())
        return cls(root, Path(checkpoint_dirpath) if checkpoint_dirpath else root / "checkpoints")

    @property
    def last_checkpoint(self) -> Path:
        """``checkpoints/last.ckpt``: where ``--ckpt_path last`` resumes from and where students read a teacher."""
        return self.checkpoint_dir / LAST

    def existing_files(self) -> list[Path]:
        """The files an earlier run left here (config, logs, summary, checkpoints), in a stable order."""
        files = [self.root / name for name in RUN_FILES if (self.root / name).is_file()]
        if self.root.is_dir():
            files += sorted(self.root.glob(LOG_PATTERN))
        if self.checkpoint_dir.is_dir():
            files += sorted(p for p in self.checkpoint_dir.iterdir() if p.suffix == ".ckpt")
        return files

    def holds(self, checkpoint: str | os.PathLike) -> bool:
        """Whether ``checkpoint`` is one of this run's checkpoints (links are not followed)."""
        return Path(os.path.abspath(checkpoint)).parent == Path(os.path.abspath(self.checkpoint_dir))

    def claim(self, ckpt_path: str | None, overwrite: bool) -> list[Path]:
        """Make the folder this run's before anything is written; returns the files deleted by ``overwrite``.

        Resuming (``ckpt_path`` is ``"last"`` or one of this folder's checkpoints) keeps the folder's files, as does
        a folder without a run. Otherwise ``overwrite`` deletes the earlier run's files.

        Raises:
            RunFolderError: the folder holds another run and neither resuming nor ``overwrite`` was asked for.
        """
        earlier = self.existing_files()
        if not earlier or ckpt_path == "last" or (ckpt_path is not None and self.holds(ckpt_path)):
            return []
        if overwrite:
            for path in earlier:
                path.unlink()
            return earlier
        raise RunFolderError(self._refusal(earlier, ckpt_path))

    def _refusal(self, earlier: list[Path], ckpt_path: str | None) -> str:
        shown = ", ".join(str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p) for p in earlier[:3])
        more = f" and {len(earlier) - 3} more" if len(earlier) > 3 else ""
        elsewhere = f" (--ckpt_path {ckpt_path} is not one of its checkpoints)" if ckpt_path else ""
        return (
            f"{self.root} already holds a run ({shown}{more}){elsewhere}. A folder holds one run, so that "
            f"{self.last_checkpoint} always belongs to the run its config.yaml describes. Either\n"
            f"  resume that run:         --ckpt_path last  (its {self.last_checkpoint})\n"
            f"  replace it:              --overwrite true  (deletes its config, logs and checkpoints)\n"
            f"  keep it, run elsewhere:  --trainer.default_root_dir {self.root}_2"
        )


def write_summary(folder: Path, metrics: dict[str, float], **info: Any) -> Path:
    """Write ``folder/summary.json``: ``info`` (epochs, steps, ...) and the final ``metrics`` of a finished run."""
    path = folder / SUMMARY_FILE
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**info, "metrics": metrics}, indent=2, sort_keys=True) + "\n")
    return path

"""Train CalibratedDUPS on the 8x8 digits from Python: ``python train.py [--fast]``.

The same run through the CLI: ``PYTHONPATH=. kd-lightning fit --config config.yaml``. Writes the checkpoints and a
``metrics.json`` of the final validation and test metrics under ``--root-dir``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
from calibrated_dups import CalibratedDUPS
from digits8x8 import Digits8x8DataModule
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning import NesterovSGD, RNGStateCheckpoint


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="2 stages of 1 epoch (a smoke run of seconds)")
    parser.add_argument("--root-dir", default="runs/train_py", help="where checkpoints and metrics.json go")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, auto ...")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed)
    epochs, stages = (2, 2) if args.fast else (12, 4)
    model = CalibratedDUPS(
        num_stages=stages,
        backbone="tiny_digits_cnn",
        num_classes=10,
        optimizer=lambda params: NesterovSGD(params, lr=0.05),
    )
    data = Digits8x8DataModule(batch_size=64, seed=args.seed)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=args.accelerator,
        devices=1,
        default_root_dir=args.root_dir,
        callbacks=[ModelCheckpoint(save_last=True), RNGStateCheckpoint()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics.update({k: float(v) for k, v in trainer.test(model, data, verbose=False)[0].items()})
    Path(args.root_dir, "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"test/acc1 {metrics['test/acc1']:.4f}  test/overconfidence {metrics['test/overconfidence']:+.4f}")
    return metrics


if __name__ == "__main__":
    main()

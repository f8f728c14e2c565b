"""The DUPS paper's Table 5 comparison (small LSTM on Penn Treebank: SGD, LS, DUPS) at a chosen scale, one run.

Runs ``configs/ptb/lstm_small_<method>.yaml`` through the ``kd-lightning`` CLI with the given seed and schedule,
then appends the final validation and test perplexities, the wall time and the peak memory of the process as one
JSON line to ``--out``. The paper's scale is 15 passes (``--passes 15 --epochs-per-pass 1``, 5 stages of 3 passes);
on 2 CPU cores a pass takes 5-8 minutes. Example (one pass split in 5 epochs, 5 stages of one epoch)::

    python scripts/ptb_small_lstm.py --method dups --seed 1 --passes 1 --epochs-per-pass 5 --out ptb.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from kd_lightning.cli import main as cli_main

METHODS = ("sgd", "ls", "dups", "dups_topk")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", type=int, default=15, help="passes over the training stream")
    parser.add_argument("--epochs-per-pass", type=int, default=1, help="Lightning epochs per pass")
    parser.add_argument("--data-dir", default="data/ptb")
    parser.add_argument("--root", default="runs/ptb", help="where logs and checkpoints go")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file the result is appended to")
    args = parser.parse_args()
    epochs = args.passes * args.epochs_per_pass
    root = f"{args.root}/{args.method}_seed{args.seed}"
    start = time.perf_counter()
    cli = cli_main(
        [
            "fit",
            f"--config=configs/ptb/lstm_small_{args.method}.yaml",
            f"--seed_everything={args.seed}",
            f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            f"--data.init_args.data_dir={args.data_dir}",
            f"--data.init_args.epochs_per_pass={args.epochs_per_pass}",
        ]
    )
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}  # the last validation's
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)  # the final weights
    metrics.update({k: float(v) for k, v in cli.trainer.callback_metrics.items()})
    record = {
        "method": args.method,
        "seed": args.seed,
        "passes": args.passes,
        "epochs_per_pass": args.epochs_per_pass,
        "test_ppl": metrics.get("test/ppl"),
        "val_ppl_last_epoch": metrics.get("val/ppl"),
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    with args.out.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(record)


if __name__ == "__main__":
    run()

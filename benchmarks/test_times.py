"""The test suite's time per test file, as the Markdown table of docs/contributing.md.

Runs pytest with a JUnit XML report (extra arguments go to pytest: paths, ``-k`` ...) and sums each file's test
times (set-up, call and tear-down of every test; module imports at collection are not counted)::

    python benchmarks/test_times.py                      # the whole suite, as `make test` runs it
    python benchmarks/test_times.py tests/test_readme.py tests/test_examples.py
    python benchmarks/test_times.py --xml report.xml     # only aggregate a report written earlier

The table lists files slowest first, then the sum of the test times and the wall time of the pytest run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(pytest_args: list[str], xml_path: Path) -> tuple[int, float]:
    """Run the tests with a JUnit report at ``xml_path``; returns pytest's exit code and the wall time in seconds."""
    command = [sys.executable, "-m", "pytest", "-q", "-o", "junit_family=xunit1", f"--junitxml={xml_path}"]
    start = time.perf_counter()
    code = subprocess.call([*command, *pytest_args], cwd=ROOT)
    return code, time.perf_counter() - start


def times_per_file(xml_path: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds and number of tests of every test file of a JUnit report (xunit1: each test names its file)."""
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = case.get("file") or case.get("classname", "?").replace(".", "/") + ".py"
        seconds[name] += float(case.get("time", 0.0))
        counts[name] += 1
    return dict(seconds), dict(counts)


def markdown_table(seconds: dict[str, float], counts: dict[str, int], wall: float | None = None) -> str:
    """One row per file, slowest first, and a total row."""
    rows = ["| test file | tests | seconds |", "|---|---|---|"]
    for name in sorted(seconds, key=lambda n: (-seconds[n], n)):
        rows.append(f"| `{name}` | {counts[name]} | {seconds[name]:.1f} |")
    total = f"| total (sum of test times) | {sum(counts.values())} | {sum(seconds.values()):.1f} |"
    rows.append(total if wall is None else f"{total}\n| wall time of the run (collection included) | | {wall:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xml", type=Path, help="aggregate this JUnit report instead of running pytest")
    args, pytest_args = parser.parse_known_args(argv)
    code, wall = 0, None
    if args.xml is not None:
        xml_path = args.xml
    else:
        xml_path = Path(tempfile.mkdtemp(prefix="kd_test_times_")) / "report.xml"
        code, wall = run_pytest(pytest_args, xml_path)
    print(markdown_table(*times_per_file(xml_path), wall=wall))
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The README's runnable code blocks run, on tiny settings, so the README cannot drift from the code.

A code block is runnable when the line right before its opening fence is ``<!-- runnable -->`` or
``<!-- runnable: EXTRA ARGS -->``. Every ``kd-lightning`` command of such a block (``.venv/bin/kd-lightning`` too)
that trains or evaluates runs with :data:`TINY` and the block's ``EXTRA ARGS`` appended; commands that only print
(help, ``--print_config``, ``backbones``) and the other lines run as written. Blocks run in a
fresh directory holding a link to ``configs/`` and a copy of ``examples/``, so relative paths (``runs/...``)
resolve as they do from the repository root and nothing is written into the repository. A block made only of
``kd-lightning`` commands runs in this process (``kd_lightning.cli.main``, the console script's function: no
Lightning import per command); any other block runs as a ``bash -e`` script with the virtual environment's ``bin``
first on ``PATH``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kd_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!--\s*runnable(?::(?P<extra>.*?))?\s*-->\s*$")
#: Appended to every ``kd-lightning`` command of a runnable block.
TINY = [
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
#: At least this many runnable blocks: a lost marker fails the suite instead of silently testing less.
MIN_BLOCKS = 5
#: Commands that must stay runnable (substrings of a marked block's commands).
REQUIRED = [
    "fit --config configs/quickstart.yaml",
    "test --config configs/quickstart.yaml",
    "configs/synthetic/dups.yaml",
    "configs/synthetic/kd_mlp16.yaml",
    "configs/digits/generations_resnet20.yaml",
    "configs/digits/okddip_resnet20.yaml",
    "configs/digits/self_distill_resnet20.yaml",
    "python train.py",
    "kd-lightning fit --config config.yaml",
]


@dataclass(frozen=True)
class Block:
    """A runnable code block: where it starts in the README, its extra arguments and its logical lines."""

    line: int
    extra: tuple[str, ...]
    lines: tuple[str, ...]

    def commands(self) -> list[list[str]]:
        """Each logical line as words, comments dropped (empty lines and comment-only lines left out)."""
        return [words for words in (shlex.split(line, comments=True) for line in self.lines) if words]


def runnable_blocks(text: str) -> list[Block]:
    """The marked blocks of a Markdown text (backslash continuations joined into one logical line)."""
    lines = text.splitlines()
    blocks = []
    for index, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if match is None:
            continue
        fence = lines[index + 1] if index + 1 < len(lines) else ""
        if not fence.startswith("```"):
            raise ValueError(f"README.md:{index + 1}: a runnable marker must be right before a code fence")
        end = next(i for i in range(index + 2, len(lines)) if lines[i].startswith("```"))
        body = "\n".join(lines[index + 2 : end]).replace("\\\n", " ")
        extra = tuple(shlex.split(match.group("extra") or ""))
        blocks.append(Block(index + 1, extra, tuple(body.splitlines())))
    return blocks


def is_kd_lightning(words: list[str]) -> bool:
    """Whether the command runs the ``kd-lightning`` console script (no environment assignments before it)."""
    return Path(words[0]).name == "kd-lightning"


def tiny(words: list[str], block: Block) -> list[str]:
    """The ``kd-lightning`` command with :data:`TINY` and the block's arguments appended, unless it only prints
    (``--help``, ``--model.help X``, ``--print_config``, ``backbones``), which runs as written."""
    prints = any(w in ("-h", "--help") or w.endswith(".help") or w.startswith("--print_config") for w in words)
    if prints or words[1:2] == ["backbones"]:
        return list(words)
    return [*words, *TINY, *block.extra]


BLOCKS = runnable_blocks(README.read_text())


def test_enough_blocks_are_marked():
    assert len(BLOCKS) >= MIN_BLOCKS, f"only {len(BLOCKS)} runnable blocks in README.md (expected >= {MIN_BLOCKS})"
    marked = "\n".join(" ".join(words) for block in BLOCKS for words in block.commands())
    missing = [command for command in REQUIRED if command not in marked]
    assert not missing, f"no runnable README block runs {missing}"


def test_marker_must_precede_a_fence():
    with pytest.raises(ValueError, match=r"README.md:2: a runnable marker must be right before a code fence"):
        runnable_blocks("text\n<!-- runnable -->\nnot a fence\n")
    (block,) = runnable_blocks("<!-- runnable: --a 1 -->\n```bash\nkd-lightning fit \\\n  --x y  # note\n```\n")
    assert block.extra == ("--a", "1") and block.commands() == [["kd-lightning", "fit", "--x", "y"]]


def test_bash_blocks_get_the_tiny_arguments_only_on_kd_lightning_commands():
    (block,) = runnable_blocks(
        "<!-- runnable: --x=1 -->\n```bash\ncd here && ls  # as written\n"
        "PYTHONPATH=. .venv/bin/kd-lightning fit --config c.yaml\nkd-lightning fit --help\n```\n"
    )
    assert bash_script(block).splitlines() == [
        "cd here && ls  # as written",
        f"PYTHONPATH=. kd-lightning fit --config c.yaml {shlex.join(TINY)} --x=1",
        "kd-lightning fit --help",
    ]


def test_a_failing_command_fails(tmp_path):
    with pytest.raises(AssertionError, match="exited with 2"):
        run_in_process(["kd-lightning", "fit", "--config", str(tmp_path / "missing.yaml")])


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that looks like the repository root to the README's commands."""
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("runs", "__pycache__"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def run_in_process(words: list[str]) -> None:
    """One ``kd-lightning`` command through the console script's function; fails on an error exit."""
    try:
        main(words[1:])
    except SystemExit as exit_info:  # --help, --print_config: exit 0
        assert exit_info.code in (0, None), f"`{shlex.join(words)}` exited with {exit_info.code}"


def bash_script(block: Block) -> str:
    """The block as a bash script: ``kd-lightning`` commands (after any ``VAR=value``) get the tiny arguments and the
    block's extra ones; the other lines run exactly as written."""
    script = []
    for line in block.lines:
        words = shlex.split(line, comments=True)
        if not words:
            continue
        position = next((i for i, word in enumerate(words) if not re.match(r"^\w+=", word)), len(words))
        if position < len(words) and is_kd_lightning(words[position:]):
            line = shlex.join([*words[:position], *tiny(["kd-lightning", *words[position + 1 :]], block)])
        script.append(line)
    return "\n".join(script)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_runnable_block(block: Block, sandbox: Path, capsys: pytest.CaptureFixture[str]):
    commands = block.commands()
    if all(is_kd_lightning(words) for words in commands):
        for words in commands:
            run_in_process(tiny(words, block))
        return
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    script = bash_script(block)
    result = subprocess.run(
        ["bash", "-e", "-c", script], cwd=sandbox, env=environ, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"README.md:{block.line}:\n{script}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )


#: The classes whose first docstring line (what ``--model.help`` / ``--trainer.callbacks.help`` prints above the
#: options) states the method's loss, with a fragment of it.
LOSS_IN_HELP = {
    "ClassifierModule": "L = CE(z, y)",
    "StudentGroupModule": "L = sum_i CE(z_i, y)",
    "DMLModule": "sum_{j!=i} T^2 KL(p_j^T || p_i^T)",
    "CLILRModule": "KL(softmax(mean_{j!=i} z_j / T) || p_i^T)",
    "ONEModule": "KL(p_e^T || p_i^T), z_e = sum_i g_i z_i",
    "OKDDipModule": "Eq. 8): L = sum_i CE(z_i,y) + w(t) T^2",
    "SelfDistillModule": "Eq. 5: CE(z_a,y) + CE(z_b,y) + lambda",
    "GenerationModule": "(1-eta) CE + eta (f_a1 - mean_{k>1} f_ak) (Eq. 3)",
    "SnapshotDistillModule": "lambda_CE CE + lambda_KD T^2 KL(p_teacher^T || p^T)",
    "GenerationalKD": "Eq. 3 of Yang et al.",
    "DUPSModule": "KL(f_T(y) || softmax(z/T))",
    "DistillModule": "alpha T^2 KL(rho || softmax(z/T))",
    "LanguageModelModule": "log p(w_{b,t+1} | w_{b,<=t})",
    "LanguageModelDUPSModule": "KL(f_T(w) || softmax(z/T))",
    "LanguageModelDistillModule": "alpha T^2 KL(rho || softmax(z/T))",
}


@pytest.mark.parametrize("name", sorted(LOSS_IN_HELP))
def test_first_docstring_line_states_the_loss(name):
    import kd_lightning

    assert LOSS_IN_HELP[name] in getattr(kd_lightning, name).__doc__.splitlines()[0]


def test_model_help_shows_the_loss(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "kd_lightning.OKDDipModule"])
    assert exit_info.value.code in (0, None)
    assert LOSS_IN_HELP["OKDDipModule"] in capsys.readouterr().out

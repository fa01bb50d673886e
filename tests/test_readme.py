"""README's promises: two set-up commands first, and a first program that runs and resumes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)


def test_readme_opens_with_the_two_setup_commands() -> None:
    text = README.read_text()
    first_block = _blocks("sh")[0]
    assert text.index("```sh") < text.index("```python")
    commands = first_block.strip().splitlines()
    assert len(commands) == 2
    example, tests = commands
    assert "examples/train_numpy.py" in example
    assert "pytest" in tests
    for command in commands:  # each one sets up a fresh machine by itself
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install")


@pytest.mark.slow
def test_first_program_runs_and_resumes(tmp_path: Path) -> None:
    program = tmp_path / "first.py"
    program.write_text(_blocks("python")[0])
    outputs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, str(program)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.strip())
    assert outputs[0].startswith("step 100, loss")
    assert outputs[1].startswith("step 200, loss")  # the second run resumed at 100
    assert len(_blocks("python")[0].strip().splitlines()) <= 25

"""The README's promises, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_ten_line_script_gets_a_video_from_the_fake() -> None:
    """The README's script against the fake service prints a result URL and no 429s."""
    (script,) = [block for block in python_blocks() if "FakeApixo(generation_time" in block]
    assert len(script.strip().splitlines()) <= 13
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    url, _, tail = done.stdout.strip().partition(" ")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/files/task_\w+\.mp4", url)
    assert tail == "429s: 0"


def test_the_first_screen_has_both_commands() -> None:
    """The main job and the test command are on the README's first screen, and the test
    command is the one CI runs."""
    first_screen = "\n".join(README.read_text().splitlines()[:30])
    assert "sora-async batch examples/prompts.jsonl -o out --simulate" in first_screen
    test_command = '.venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest'
    assert test_command in first_screen
    assert test_command in (README.parent / ".ci" / "run").read_text()


def test_the_catalogue_example_keeps_each_model_inside_its_limits(tmp_path: Path) -> None:
    """The README's three-model script: images saved as .png, and the fake's per-model
    counters show each model filling its own slots and no more."""
    (script,) = [block for block in python_blocks() if "max_concurrent_tasks_by_model" in block]
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout.strip()
    assert printed == (
        "['.png', '.png', '.png'] {'sora-2-pro': 10, 'veo-3-1': 3, 'seedream-4-5': 1}"
    )
    assert f"prints `{printed}`" in README.read_text()

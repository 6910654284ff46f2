"""One seed of the kill -9 soak (benchmarks/kill9.py): the real CLI, SIGKILLed at random
moments and rerun to the end, in real time against the fake service."""

from __future__ import annotations

from pathlib import Path

from benchmarks.kill9 import soak


async def test_one_seed_of_the_kill9_soak(tmp_path: Path) -> None:
    """Killed 1-3 times and rerun: nothing lost, nothing created twice, no file torn."""
    result = await soak(seed=7, items=16, folder=tmp_path)
    assert result["exit"] == (0 if result["uncertain"] == 0 else 1)
    assert result["lost"] == 0
    assert result["duplicate"] == 0
    assert result["torn"] == 0
    assert result["downloaded"] + result["uncertain"] == 16

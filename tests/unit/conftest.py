"""The unit layer: no emulator, no network. Runs on every supported Python (3.10-3.13)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a real tmpfs of `size` bytes (root only): a disk that really fills up and can
    really be remounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and the dev machine run as root)")
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                       check=True)  # fmt: skip
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount(point: Path, mode: str) -> None:
    """Remount a tmpfs `ro` or `rw`, as an operator (or a failing disk) would."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)

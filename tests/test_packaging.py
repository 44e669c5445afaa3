"""The wheel that the Docker image installs (`pip install .` from pyproject.toml, README.md
and app/, as the Dockerfile copies them) carries everything the app reads at run time, and
the fan-out's C send loop."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_file_of_the_app_and_the_c_send_loop(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "app", source / "app", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    files = {p.relative_to(source).as_posix() for p in (source / "app").rglob("*") if p.is_file()}
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("pricefeed-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    assert files - packed == set(), "the image would start without these"
    assert any(n.startswith("app/prices/_fanout.") and n.endswith(".so") for n in packed)

"""The image's build stage has what it installs: the Dockerfile copies the lock files its
RUN lines install from, and the wheel that `pip install .` builds from what it copies
(pyproject.toml, README.md, app/ and the JavaScript client it links to) carries everything the
app reads at run time, and the fan-out's C send loop. And the image runs in prod unless told
otherwise."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_stage() -> tuple[list[str], list[str]]:
    """The sources the Dockerfile's build stage COPYs into /src, and its RUN commands."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    stage = re.split(r"^FROM ", text, flags=re.MULTILINE)[1]  # up to the final stage's FROM
    copied, runs = [], []
    for line in stage.splitlines():
        if line.startswith("COPY "):
            args = [a for a in shlex.split(line)[1:] if not a.startswith("--")]
            copied += args[:-1]
        elif line.startswith("RUN "):
            runs.append(line)
    return copied, runs


def final_stage_env() -> dict[str, str]:
    """The variables the final stage's ENV lines set (`ENV A=1 B=2`)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    stage = re.split(r"^FROM ", text, flags=re.MULTILINE)[-1]
    pairs = [
        arg.split("=", 1)
        for line in stage.splitlines()
        if line.startswith("ENV ")
        for arg in shlex.split(line)[1:]
    ]
    return {name: value for name, value in pairs}


def test_the_image_runs_in_prod_unless_told_otherwise() -> None:
    """`docker run` without `-e ENV=…` must not seed the demo client nor print its secret."""
    assert final_stage_env().get("ENV") == "prod"


def test_the_build_stage_copies_the_lock_files_it_installs_from() -> None:
    copied, runs = build_stage()
    installs = " ".join(r for r in runs if "pip install" in r)
    lock_files = re.findall(r"-r\s+(\S+)", installs)
    assert "requirements/lock.txt" in lock_files
    assert "--require-hashes" in installs
    assert set(lock_files) <= set(copied), "the image would build without these"
    # The project goes in on its own: nothing it depends on comes from outside the locks.
    projects = [r for r in runs if re.search(r"pip install .* \.(\s|$)", r)]
    assert len(projects) == 1
    assert "--no-deps" in projects[0] and "--no-build-isolation" in projects[0]


def test_the_wheel_holds_every_file_of_the_app_and_the_c_send_loop(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    copied, _ = build_stage()
    assert {"pyproject.toml", "README.md", "app"} <= set(copied)
    for name in copied:
        if (REPO / name).is_dir():
            # Links stay links, as COPY keeps them: one to a file the stage lacks breaks the build.
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # fmt: skip
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, source / name)
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
    # The JavaScript client the service serves, as a file: clients/js/pricefeed.js itself.
    served = zipfile.ZipFile(wheel).read("app/prices/static/pricefeed.js")
    assert served == (REPO / "clients" / "js" / "pricefeed.js").read_bytes()


def test_the_image_installs_the_sdk_from_this_repo_not_an_index() -> None:
    """pricefeed-client (clients/python) is the app's dependency but no lock pins it: a
    directory has no hash. The build stage copies it and installs it with the app, --no-deps,
    so nothing named pricefeed-client is ever fetched."""
    copied, runs = build_stage()
    assert "clients/python" in copied
    (install,) = [r for r in runs if "./clients/python" in r]
    assert "--no-deps" in install and "--no-build-isolation" in install
    for lock in ("lock.txt", "build.lock.txt", "dev.lock.txt"):
        pins = (REPO / "requirements" / lock).read_text()
        assert not re.search(r"^pricefeed-client\b", pins, flags=re.MULTILINE), lock


def test_the_sdk_wheel_is_typed_and_needs_only_httpx_and_websockets(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(tmp_path), str(REPO / "clients" / "python")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("pricefeed_client-*.whl")
    packed = zipfile.ZipFile(wheel)
    names = set(packed.namelist())
    sources = {
        p.relative_to(REPO / "clients" / "python").as_posix()
        for p in (REPO / "clients" / "python" / "pricefeed_client").glob("*.py")
    }
    assert sources | {"pricefeed_client/py.typed"} <= names
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [
        line.split(":", 1)[1].strip()
        for line in packed.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert sorted(r.split(">")[0].split(";")[0] for r in requires) == [
        "httpx", "rich", "websockets",
    ]  # fmt: skip
    assert [r for r in requires if r.startswith("rich")][0].endswith('extra == "cli"')


def test_the_sdk_imports_nothing_of_the_server() -> None:
    """A script that reads prices must not need (nor drag in) the server's stack."""
    probe = (
        "import sys, pricefeed_client, pricefeed_client.cli, pricefeed_client.sync\n"
        "heavy = {'app', 'fastapi', 'pydantic', 'sqlalchemy', 'redis', 'orjson'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

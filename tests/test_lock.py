"""The lock files that every install takes its versions from (`make install`, CI, the
Dockerfile) still match pyproject.toml: a bound raised or a dependency added without
`make lock` fails here, not in an image built later."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Packages of this repo (the SDK): installed from their directory, so in no lock (a directory
# has no hash); their own dependencies are locked like any other.
LOCAL = {
    canonicalize_name(name): REPO / source["path"]
    for name, source in PYPROJECT["tool"]["uv"]["sources"].items()
}
# The image's platform: python:3.11-slim on Linux (x86_64 or aarch64 alike for these markers).
IMAGE = {
    "python_version": "3.11", "python_full_version": "3.11.14", "sys_platform": "linux",
    "platform_system": "Linux", "platform_python_implementation": "CPython",
    "implementation_name": "cpython", "os_name": "posix", "platform_machine": "x86_64",
}  # fmt: skip


def pins(name: str, env: dict[str, str] | None = IMAGE) -> dict[str, Version]:
    """Each `name==version` of a lock file that applies on the image (or, with env=None, here),
    with its hashes."""
    found: dict[str, Version] = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        if not line or line[0] in " #":
            continue
        req = Requirement(line.rstrip(" \\"))
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name}: {line} is not an exact pin"
        if req.marker is None or req.marker.evaluate(env):
            found[canonicalize_name(req.name)] = Version(spec.version)
    hashed = (REPO / "requirements" / name).read_text().count("--hash=sha256:")
    assert hashed >= len(found), f"{name}: a pin without a hash"
    return found


def assert_locked(requirements: list[str], lock: str) -> None:
    locked = pins(lock)
    stale = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(IMAGE):
            continue
        directory = LOCAL.get(canonicalize_name(req.name))
        if directory is not None:
            local = tomllib.loads((directory / "pyproject.toml").read_text())["project"]
            assert req.specifier.contains(local["version"]), f"{text}: {directory} is not it"
            assert_locked(local["dependencies"], lock)
            for extra in req.extras:
                assert_locked(local["optional-dependencies"][extra], lock)
            continue
        version = locked.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            stale.append(f"{text} (locked: {version})")
    assert stale == [], f"requirements/{lock} is stale, run `make lock`: {stale}"


def test_the_runtime_lock_holds_every_dependency_within_its_bounds() -> None:
    assert_locked(PYPROJECT["project"]["dependencies"], "lock.txt")


def test_the_build_lock_holds_what_builds_the_package() -> None:
    assert_locked(PYPROJECT["build-system"]["requires"], "build.lock.txt")


@pytest.mark.parametrize("lock", ["lock.txt", "build.lock.txt"])
def test_the_dev_lock_is_the_runtime_lock_plus_the_dev_tools(lock: str) -> None:
    dev = pins("dev.lock.txt")
    assert_locked(PYPROJECT["project"]["optional-dependencies"]["dev"], "dev.lock.txt")
    assert_locked(PYPROJECT["project"]["dependencies"], "dev.lock.txt")
    differ = {n: (v, dev.get(n)) for n, v in pins(lock).items() if dev.get(n) != v}
    assert differ == {}, "the tests would run on other versions than the image ships"


def test_this_venv_runs_the_locked_versions() -> None:
    installed: dict[str, Version] = {
        canonicalize_name(d.metadata["Name"]): Version(d.version) for d in distributions()
    }
    differ = {n: (v, installed.get(n)) for n, v in pins("dev.lock.txt", env=None).items()
              if installed.get(n) != v}  # fmt: skip
    if sys.prefix == sys.base_prefix:
        pytest.skip("not in a venv: nothing installed from the lock to compare")
    assert differ == {}, "reinstall: make install (the lock changed after this venv was made)"


def test_the_canary_asks_for_every_dependency_with_no_version_at_all() -> None:
    """scripts/newest-deps.py, which the CI canary installs from: the same names, extras and
    markers as pyproject.toml, no bound, so pip takes the newest release of each."""
    printed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "newest-deps.py"), "--extra", "dev"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    project = PYPROJECT["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    got = [Requirement(line) for line in printed]
    assert [str(r.specifier) for r in got] == [""] * len(declared)
    assert [r.url for r in got] == [
        LOCAL[canonicalize_name(r.name)].resolve().as_uri()
        if canonicalize_name(r.name) in LOCAL
        else None
        for r in declared
    ], "the repo's own packages come from their directory, never from an index"
    assert [(r.name, r.extras, r.marker) for r in got] == [
        (r.name, r.extras, r.marker) for r in declared
    ]

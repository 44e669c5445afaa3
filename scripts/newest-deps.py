#!/usr/bin/env python3
"""Print pyproject.toml's dependencies without their versions, one a line, for pip:
`pip install -r <(scripts/newest-deps.py --extra dev)` takes the newest release of each that
the others allow, whatever our bounds and the lock say. The CI canary (scripts/canary.sh)
installs them so a release that breaks pricefeed shows up before anyone raises a bound.

Names keep their extras and environment markers: `uvicorn[standard]>=0.52.1,<0.56` prints
`uvicorn[standard]`, `uvloop>=0.23; sys_platform != 'win32'` prints
`uvloop; sys_platform != 'win32'`. Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# PEP 508: a name, optional [extras], then a version specifier (or a URL), then ; markers.
REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<extras>\[[^\]]*\])?"
    r"(?P<version>[^;]*?)\s*(?:;\s*(?P<marker>.+?))?\s*$"
)


def unversioned(requirement: str) -> str:
    match = REQUIREMENT.match(requirement)
    if match is None or match["version"].lstrip().startswith("@"):
        raise ValueError(f"not a plain name with a version specifier: {requirement!r}")
    extras = (match["extras"] or "").replace(" ", "")
    marker = f"; {match['marker']}" if match["marker"] else ""
    return f"{match['name']}{extras}{marker}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="an optional group too")
    args = parser.parse_args(argv)
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in args.extra:
        requirements += project["optional-dependencies"][extra]
    print(*(unversioned(r) for r in requirements), sep="\n")


if __name__ == "__main__":
    main(sys.argv[1:])

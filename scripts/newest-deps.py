#!/usr/bin/env python3
"""Print pyproject.toml's dependencies without their versions, one a line, for pip:
`pip install -r <(scripts/newest-deps.py --extra dev)` takes the newest release of each that
the others allow, whatever our bounds and the lock say. The CI canary (scripts/canary.sh)
installs them so a release that breaks pricefeed shows up before anyone raises a bound.

Names keep their extras and environment markers: `uvicorn[standard]>=0.52.1,<0.56` prints
`uvicorn[standard]`, `uvloop>=0.23; sys_platform != 'win32'` prints
`uvloop; sys_platform != 'win32'`. A package of this repo (a path in `[tool.uv.sources]`: the
SDK, clients/python) prints as a direct reference to its directory, `pricefeed-client @
file:///…/clients/python`: pip builds it from there, with the newest releases of what it
needs, and never looks for its name on an index. Standard library only: it runs before any
venv exists.
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


def unversioned(requirement: str, local: dict[str, Path] | None = None) -> str:
    """`requirement` without its version; one of `local` (name → directory) as a reference
    to its directory."""
    match = REQUIREMENT.match(requirement)
    if match is None or match["version"].lstrip().startswith("@"):
        raise ValueError(f"not a plain name with a version specifier: {requirement!r}")
    extras = (match["extras"] or "").replace(" ", "")
    marker = f"; {match['marker']}" if match["marker"] else ""
    directory = (local or {}).get(match["name"])
    if directory is not None:
        return f"{match['name']}{extras} @ {directory.as_uri()}{marker}"
    return f"{match['name']}{extras}{marker}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="an optional group too")
    args = parser.parse_args(argv)
    pyproject = tomllib.loads(PYPROJECT.read_text())
    project = pyproject["project"]
    requirements = list(project["dependencies"])
    for extra in args.extra:
        requirements += project["optional-dependencies"][extra]
    sources = pyproject.get("tool", {}).get("uv", {}).get("sources", {})
    local = {
        name: (PYPROJECT.parent / source["path"]).resolve()
        for name, source in sources.items()
        if "path" in source
    }
    print(*(unversioned(r, local) for r in requirements), sep="\n")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Print the requirements pyproject.toml declares, one per line, for ``pip install -r``.

The image installs third-party packages from this list in a layer of its own, before the source is
copied in, so that editing code does not reinstall every dependency.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement (``Torch==2.1`` -> ``torch``)."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(
    pyproject: Path, extra: str | None = None, only: Sequence[str] = (), omit: Sequence[str] = ()
) -> list[str]:
    """The core dependencies, or those of one extra, filtered by project name."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    if extra is None:
        declared: list[str] = project["dependencies"]
    else:
        extras: dict[str, list[str]] = project.get("optional-dependencies", {})
        if extra not in extras:
            raise KeyError(f"pyproject.toml has no extra {extra!r} (has: {', '.join(sorted(extras))})")
        declared = extras[extra]
    wanted = {requirement_name(n) for n in only}
    unwanted = {requirement_name(n) for n in omit}
    return [
        r
        for r in declared
        if (not wanted or requirement_name(r) in wanted) and requirement_name(r) not in unwanted
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", help="an optional-dependencies group instead of the core dependencies")
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="keep only these projects"
    )
    parser.add_argument(
        "--omit", action="append", default=[], metavar="NAME", help="leave these projects out"
    )
    args = parser.parse_args(argv)
    try:
        lines = requirements(args.pyproject, args.extra, args.only, args.omit)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    if not lines:
        print("error: no requirement matched", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

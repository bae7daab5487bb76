"""Generate the Python code and type stubs of every contract in protos/ into lib/.

    python tools/gen_protos.py           regenerate (what `make proto` runs)
    python tools/gen_protos.py --check   exit 1 if the committed code differs from a fresh run

The include root is protos/, so `protos/tokenyard/api/router/v1/router.proto` becomes the module
`tokenyard.api.router.v1.router_pb2`, imported by package path. The compiler is the pinned
grpcio-tools and the stub plugins come from the pinned mypy-protobuf, both from the dev extra;
the same versions produce byte-identical output, which is what makes the drift check
meaningful. Generated files are never edited afterwards.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "lib"
# Everything protoc and its plugins write; anything else under lib/ is hand-written.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


class GenerationError(Exception):
    pass


def proto_files() -> list[str]:
    """Every .proto under protos/, relative to it, sorted so the compiler sees a stable order."""
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


def _plugin(name: str) -> Path:
    # protoc looks plugins up on PATH, which need not include the virtualenv when it is
    # called as .venv/bin/python without activation; point at this interpreter's scripts.
    path = Path(sysconfig.get_path("scripts")) / name
    if path.is_file():
        return path
    found = shutil.which(name)
    if found is None:
        raise GenerationError(f"{name} not found: install the dev extra (make install)")
    return Path(found)


def generate(out_root: Path) -> None:
    """Compile every proto into out_root (a package root such as lib/)."""
    out_root.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *proto_files(),
    ]
    result = subprocess.run(args, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GenerationError(f"protoc failed ({result.returncode}):\n{result.stderr}")


def generated_files(out_root: Path) -> dict[str, Path]:
    """Generated files under out_root, keyed by their path relative to it."""
    return {
        p.relative_to(out_root).as_posix(): p
        for p in sorted(out_root.rglob("*"))
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES) and "__pycache__" not in p.parts
    }


def differences(expected_root: Path, actual_root: Path) -> list[str]:
    """One line per generated file that is missing, extra or different in actual_root."""
    expected = generated_files(expected_root)
    actual = generated_files(actual_root)
    lines: list[str] = []
    for rel in sorted(expected.keys() | actual.keys()):
        if rel not in actual:
            lines.append(f"missing:  lib/{rel}")
        elif rel not in expected:
            lines.append(f"stale:    lib/{rel} (no proto produces it)")
        else:
            want = expected[rel].read_text(encoding="utf-8").splitlines()
            have = actual[rel].read_text(encoding="utf-8").splitlines()
            if want != have:
                diff = list(difflib.unified_diff(have, want, lineterm="", n=0))
                added = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
                removed = sum(1 for d in diff if d.startswith("-") and not d.startswith("---"))
                lines.append(f"changed:  lib/{rel} (+{added} -{removed} lines)")
    return lines


def write(out_root: Path) -> list[str]:
    """Regenerate into out_root, removing generated files no proto produces any more."""
    with tempfile.TemporaryDirectory(prefix="tokenyard-protos-") as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = generated_files(fresh_root)
        written: list[str] = []
        for rel, path in generated_files(out_root).items():
            if rel not in fresh:
                path.unlink()
        for rel, src in fresh.items():
            dest = out_root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.is_file() or dest.read_bytes() != src.read_bytes():
                shutil.copyfile(src, dest)
            written.append(rel)
        return written


def check(out_root: Path) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="tokenyard-protos-") as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        return differences(fresh_root, out_root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail if lib/ differs",
    )
    options = parser.parse_args(argv)
    try:
        if options.check:
            drift = check(OUT_ROOT)
            if drift:
                print("generated code is out of date; run `make proto`:", file=sys.stderr)
                for line in drift:
                    print(f"  {line}", file=sys.stderr)
                return 1
            print(f"generated code is up to date ({len(proto_files())} protos)")
            return 0
        written = write(OUT_ROOT)
    except GenerationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"generated {len(written)} files from {len(proto_files())} protos into {OUT_ROOT.relative_to(ROOT)}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

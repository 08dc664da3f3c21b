"""Generate the Python stubs of protos/ into the SDK (clients/python/src), or check they are fresh.

The stubs are committed so the SDK installs without grpcio-tools; `--check` (run by the test suite)
regenerates into a temporary folder and fails when the committed files differ from the .proto.

    python protos/generate.py          # regenerate
    python protos/generate.py --check  # exit 1 if stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
OUT_ROOT = PROTO_ROOT.parent / "clients" / "python" / "src"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run the bundled protoc of grpcio-tools; returns the generated files relative to out_dir."""
    from grpc_tools import protoc  # build-time only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Names of generated files that are missing, extra or different in the committed tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(p.relative_to(OUT_ROOT) for p in OUT_ROOT.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
        problems = [f"extra: {p}" for p in set(committed) - set(fresh)]
        for rel in fresh:
            target = OUT_ROOT / rel
            if not target.exists():
                problems.append(f"missing: {rel}")
            elif not filecmp.cmp(Path(tmp) / rel, target, shallow=False):
                problems.append(f"stale: {rel}")
        return sorted(problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        problems = stale_files()
        if problems:
            print("generated stubs are stale; run `make protos`:\n  " + "\n  ".join(problems))
            sys.exit(1)
        print("generated stubs are fresh")
        return
    for rel in generate(OUT_ROOT):
        print(f"wrote {OUT_ROOT / rel}")


if __name__ == "__main__":
    main()

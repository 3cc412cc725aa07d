"""Generate the Python gRPC code from protos/pagemesh/v1/*.proto (run by `make proto` and `make install`).

Files are compiled from the repository root, so generated modules import each other as
`protos.pagemesh.v1.*_pb2` and never collide with the `pagemesh` facade package.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "pagemesh" / "v1"


def main() -> int:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT)) for p in PROTO_DIR.glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", *protos]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return code
    for pkg in (ROOT / "protos", ROOT / "protos" / "pagemesh", PROTO_DIR):
        (pkg / "__init__.py").touch()
    print(f"generated Python code for {len(protos)} protos in {PROTO_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

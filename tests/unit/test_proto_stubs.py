"""The committed stubs are what `make proto` makes from the committed .proto files."""

from __future__ import annotations

from pathlib import Path

from tools.gen_proto import PROTO_ROOT, generate


def test_generated_stubs_are_up_to_date(tmp_path: Path):
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    committed = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*_pb2*.py*"))
    assert fresh == committed, "stub files differ: run `make proto`"
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (PROTO_ROOT / p).read_bytes()]
    assert not stale, f"stale stubs (run `make proto`): {stale}"

"""The committed gateway/protocol/*_pb2.py modules are what scripts/protos.sh makes of protos/ today."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.protocol import feedback_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_match_the_proto_files(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "protos.sh"), str(tmp_path)], check=True, env={"PYTHON": sys.executable})
    # the descriptor's serialized bytes, not the whole text: the header names the protoc version
    text = (tmp_path / "feedback_pb2.py").read_text()
    committed = (ROOT / "gateway" / "protocol" / "feedback_pb2.py").read_text()
    marker = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
    assert text.split(marker)[1].split(")\n")[0] == committed.split(marker)[1].split(")\n")[0], \
        "gateway/protocol/feedback_pb2.py is out of date: run scripts/protos.sh"
    assert feedback_pb2.PostOutcomesRequest.DESCRIPTOR.full_name == "infergate.v1.PostOutcomesRequest"

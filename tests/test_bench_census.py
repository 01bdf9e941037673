"""bench/census.py counts the FUSE requests a daemon reads while files are created; the
docs/PERFORMANCE.md's round-trip figures come from it, so its reading of an strace log is checked
here on a log of the shapes strace writes (no tracing: strace is a benchmark tool, not
installed by the set-up)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

CENSUS = Path(__file__).resolve().parent.parent / "bench" / "census.py"


def load_census() -> ModuleType:
    sys.path.insert(0, str(CENSUS.parent))
    try:
        spec = importlib.util.spec_from_file_location("kv_bench_census", CENSUS)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(CENSUS.parent))


def header(opcode: int, length: int = 64) -> str:
    raw = length.to_bytes(4, "little") + opcode.to_bytes(4, "little")
    return "".join(f"\\x{b:02x}" for b in raw)


def test_requests_are_counted_by_opcode_from_the_fuse_descriptor_only(tmp_path: Path) -> None:
    census = load_census()
    log = tmp_path / "trace"
    log.write_text(
        "\n".join(
            [
                f'101 readv(7, [{{iov_base="{header(1)}"...}}], 1) = 64',  # LOOKUP, our layer
                f'101 read(7, "{header(35)}"..., 1052672) = 64',  # CREATE, go-fuse's read
                "102 read(7,  <unfinished ...>",  # split by another thread's line
                f'103 read(9, "{header(16)}"..., 4096) = 4096',  # a container file: not counted
                f'102 <... read resumed>"{header(39)}"..., 1052672) = 72',  # IOCTL
                "104 read(9,  <unfinished ...>",
                f'104 <... read resumed>"{header(22)}"..., 4096) = 4096',  # fd 9 again
                f'101 read(7, "{header(77)}"..., 1052672) = 64',  # an opcode without a name
                "101 read(7, 0x7f00, 1052672) = -1 EAGAIN (Resource temporarily unavailable)",
            ]
        )
        + "\n"
    )
    counts = census.opcodes(log, {7})
    assert counts == {"LOOKUP": 1, "CREATE": 1, "IOCTL": 1, "opcode 77": 1}

"""allocator=tuned|default: glibc malloc settings for CPU training steps."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from moe_mlora import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    return libc


def test_tuned_sets_both_thresholds_once(fresh: FakeLibc) -> None:
    assert allocator.configure_allocator("tuned") is True
    assert sorted(fresh.calls) == [(-3, 32 * 2**20), (-1, 256 * 2**20)]
    assert allocator.allocator_state() == "tuned"
    assert allocator.configure_allocator("tuned") is False  # already applied
    assert len(fresh.calls) == 2


def test_default_leaves_glibc_alone(fresh: FakeLibc) -> None:
    assert allocator.configure_allocator("default") is False
    assert fresh.calls == [] and allocator.allocator_state() == "default"


def test_refused_or_missing_glibc_is_not_an_error(fresh: FakeLibc, monkeypatch) -> None:
    fresh.answer = 0
    assert allocator.configure_allocator("tuned") is False
    assert allocator.allocator_state() == "default"
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.configure_allocator("tuned") is False


def test_unknown_mode_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="allocator must be one of"):
        allocator.configure_allocator("jemalloc")


MMAPPED_BYTES_FOR_A_BIG_TENSOR = """
import ctypes, sys
import torch
from moe_mlora.allocator import configure_allocator

FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
          "fordblks", "keepcost")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
configure_allocator(sys.argv[1])
before = libc.mallinfo2().hblkhd
tensor = torch.empty(5_000_000)  # 20 MB, the size of a big training-step temporary
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tuned_serves_step_sized_tensors_from_the_heap() -> None:
    """Fresh processes: glibc's defaults map a 20 MB tensor with a fresh mmap (new pages to
    fault in, given back on free, every step); tuned takes it from the reusable heap."""

    def mmapped_bytes(mode: str) -> int:
        command = [sys.executable, "-c", MMAPPED_BYTES_FOR_A_BIG_TENSOR, mode]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    assert mmapped_bytes("default") >= 20_000_000
    assert mmapped_bytes("tuned") == 0

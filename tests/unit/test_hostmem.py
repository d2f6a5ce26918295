"""Host memory phases: the low mmap threshold holds inside the outermost scope only, the steady
thresholds and a trim follow it, and a user's own MALLOC_MMAP_THRESHOLD_ leaves glibc alone."""

from __future__ import annotations

import sys

import pytest

from scaletrain import hostmem


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


def test_low_threshold_inside_the_outermost_scope_only(monkeypatch):
    libc = _Recorder()
    monkeypatch.setattr(hostmem, "_glibc", lambda: libc)
    with hostmem.returning_freed_memory():
        with hostmem.returning_freed_memory():  # nested: nothing changes on entry or exit
            pass
        assert libc.calls == [("mallopt", hostmem.M_MMAP_THRESHOLD, hostmem.PHASE_MMAP_THRESHOLD),
                              ("mallopt", hostmem.M_TRIM_THRESHOLD, hostmem.PHASE_MMAP_THRESHOLD)]
    assert libc.calls[2:] == [("mallopt", hostmem.M_MMAP_THRESHOLD, hostmem.STEADY_MMAP_THRESHOLD),
                              ("mallopt", hostmem.M_TRIM_THRESHOLD, hostmem.STEADY_TRIM_THRESHOLD), ("trim", 0)]


def test_the_steady_state_follows_an_error_too(monkeypatch):
    libc = _Recorder()
    monkeypatch.setattr(hostmem, "_glibc", lambda: libc)
    with pytest.raises(KeyError), hostmem.returning_freed_memory():
        raise KeyError("x")
    assert libc.calls[-1] == ("trim", 0) and hostmem._depth == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_users_own_threshold_wins(monkeypatch):
    hostmem._glibc.cache_clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    try:
        assert hostmem._glibc() is None
    finally:
        hostmem._glibc.cache_clear()

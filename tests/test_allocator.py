"""spikelm.allocator: with freed memory kept, a large block freed and asked for again is not faulted in anew.

Each case runs in a fresh interpreter: the allocator's settings are process-wide, and the test process's own
settings should stay as they are for the other tests."""

import subprocess
import sys
import textwrap

import pytest

from spikelm import allocator

needs_glibc = pytest.mark.skipif(allocator.libc() is None, reason="glibc's allocator only (Linux with glibc)")

# Allocate 48 MiB (above glibc's 32 MiB ceiling for its adaptive mmap threshold), write every page, free it;
# then again: the page faults of the second round say whether its memory was new.
SCRIPT = textwrap.dedent("""
    import ctypes, resource, sys
    from spikelm import allocator
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "keep":
        print(allocator.keep_freed_memory())
    size = 48 * 2**20
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*faults)
""")
PAGES = 48 * 2**20 // 4096


def faults(mode):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    *said, counts = out.strip().splitlines()
    return said, [int(n) for n in counts.split()]


@needs_glibc
def test_kept_memory_is_reused_without_page_faults():
    said, kept = faults("keep")
    assert said and said[0].startswith("glibc: freed memory kept")
    assert kept[0] >= PAGES // 2  # the first round faults its pages in
    assert max(kept[1:]) < PAGES // 20  # the later rounds reuse them


@needs_glibc
def test_glibc_as_it_is_faults_the_block_in_every_time():
    # the control: without keep_freed_memory the block is a fresh mapping in every round (what training paid)
    _, plain = faults("plain")
    assert min(plain) >= PAGES // 2


def test_keep_freed_memory_says_what_it_did_or_none():
    # in a subprocess too: the setting is process-wide
    code = "from spikelm import allocator; print(repr(allocator.keep_freed_memory()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if allocator.libc() is None:
        assert out == "None"
    else:
        assert "mmap threshold" in out and "never trimmed" in out

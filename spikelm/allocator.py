"""glibc's allocator, tuned for training on the CPU (and set aside while the benchmark measures memory).

Why: glibc serves an allocation at or above its mmap threshold with a fresh mapping of its own, and gives the
mapping back to the system when the tensor is freed. The threshold adapts to what a program frees, but never
above 32 MiB on 64-bit Linux. A spiking model's activations carry a time axis: at T = 4, batch 8, 256 tokens
and an MLP width of 1,024, one [T, B, N, 4D] tensor is exactly 32 MiB, so every such tensor of every training
step (the MLP's currents, its spikes, the neuron's saved membranes, their gradients) comes back as new pages,
each faulted in by the kernel when first written. Here a 32 MiB tensor took 16 ms to allocate and fill, and
1.4 ms when its memory was reused; a whole training step went from about 2.0 s to 1.8 s with the memory kept.

`keep_freed_memory()` raises the threshold and stops the heap's free tail from being trimmed, so a step reuses
what the previous step freed. The price: the process keeps its peak memory (a training loop needs it again at
the next step anyway), as CUDA's caching allocator does on a GPU. Without glibc (macOS, Windows, musl) it does
nothing and says so.
"""

import ctypes
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# While training: allocations below 1 GiB come from the heap (glibc 2.35 and later accept any threshold; older
# ones cap it at 32 MiB, which is then used instead), and the heap's free tail is never trimmed (-1: mallopt(3))
MMAP_THRESHOLD_TRAINING, MMAP_THRESHOLD_CAP = 2**30, 32 * 2**20
TRIM_THRESHOLD_NEVER = -1
# glibc's own steady state after its dynamic threshold has grown to the cap (trim threshold twice that)
MMAP_THRESHOLD_STEADY, TRIM_THRESHOLD_STEADY = 32 * 2**20, 64 * 2**20


def libc():
    """glibc through ctypes, or None where this is not Linux with glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        library = ctypes.CDLL("libc.so.6")
        library.mallopt  # noqa: B018 (musl has no mallopt: AttributeError)
        library.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    library.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return library


def _mallopt(library, parameter: int, value: int) -> bool:
    return bool(library.mallopt(parameter, value))


def keep_freed_memory() -> str | None:
    """Make freed memory stay with the process for reuse (see the module's docstring). Returns what was set,
    for a log or a benchmark's report, or None where there is no glibc to tune."""
    library = libc()
    if library is None:
        return None
    threshold = MMAP_THRESHOLD_TRAINING
    if not _mallopt(library, M_MMAP_THRESHOLD, threshold):  # glibc before 2.35
        threshold = MMAP_THRESHOLD_CAP
        if not _mallopt(library, M_MMAP_THRESHOLD, threshold):
            return None
    _mallopt(library, M_TRIM_THRESHOLD, TRIM_THRESHOLD_NEVER)
    return f"glibc: freed memory kept (mmap threshold {threshold // 2**20} MiB, heap never trimmed)"


def steady_state():
    """glibc's settings after its own adaptation (the state a long-running program reaches by itself): the
    mmap threshold at its 32 MiB ceiling and the trim threshold at twice that. (Pinning the mmap threshold low
    alone, with the default 128 KiB trim threshold, made a 2-thread GPT-2 forward 20x slower here.)"""
    library = libc()
    if library is not None:
        _mallopt(library, M_MMAP_THRESHOLD, MMAP_THRESHOLD_STEADY)
        _mallopt(library, M_TRIM_THRESHOLD, TRIM_THRESHOLD_STEADY)

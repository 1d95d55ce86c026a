"""Hand memory a finished stage freed back to the OS, so the next stage's peak does not stack on its leftovers.

    runner.close()
    release()          # lorax export / lorax check: after each model of the gate, and the importance matrix's
    large_blocks_to_os()   # the `lorax` console entry, once, before any command runs (exporter.cli.main.run)
    with heap_reuse(): ...  # a loop of the same short-lived large temporaries on reused pages (the imatrix)
    buf = ReusedBuffer(); buf.take(n)                   # scratch that is not fresh pages on every call

glibc keeps freed heap pages (the many mid-sized activation tensors) mapped for reuse. Measured on the 1.18B
bench export: 2.0 GB was still resident after the importance matrix's model was gone; malloc_trim handed
most of it back, while a full gc.collect() freed nothing more there and costs ~0.2 s a call once torch and
transformers are loaded (4 s of one test's 5), so it is not forced here.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
import threading

# Blocks this large or larger come straight from the kernel (mmap) and go back to it on free. glibc's own
# threshold starts at 128 KiB but rises to the size of any mmapped block freed (up to 32 MiB): after the first
# forward, torch's 16 MiB activations come from the heap, whose freed holes stay resident. A low fixed threshold
# costs page faults instead: every block above it is fresh zeroed pages. Measured on the 1.18B bench, each in its
# own process (importance matrix over 4,096 tokens; the reference decoding 10 rows x 8 tokens):
#   glibc's moving threshold   peak 4.91 GB (anonymous 2.74)   decode 19.0 s
#   fixed at 1 MiB             peak 3.26 GB (anonymous 1.07)   decode 32.4 s (18.5 s once bf16_compute reused
#                                                              its 4 MiB widening buffer)
#   fixed at 8 MiB             peak 3.25 GB (anonymous 1.06)   decode 11.8 s
MMAP_THRESHOLD = 8 << 20
# Free memory at the top of the heap past this goes back to the kernel at once: glibc's default, fixed with the
# mmap threshold so that heap_reuse knows what to put back.
TRIM_THRESHOLD = 128 << 10
# Within heap_reuse: blocks under this come from the heap, and this much free heap stays mapped.
REUSE_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)

# What large_blocks_to_os fixed, for heap_reuse to put back; empty while the process's allocator is not lorax's.
_fixed: dict[str, int] = {}


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    return bool(mallopt is not None and mallopt(param, int(value)) == 1)


def large_blocks_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (which also stops it from moving), and
    its trim threshold at glibc's default. Process-wide, so only an entry point that owns the process calls it
    (the `lorax` command), never a library function. False where there is no glibc mallopt (macOS, musl) or it
    refused."""
    ok = _mallopt(_M_MMAP_THRESHOLD, threshold) and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if ok:
        _fixed.update(mmap=threshold, trim=TRIM_THRESHOLD)
    return ok


@contextlib.contextmanager
def heap_reuse(threshold: int = REUSE_THRESHOLD):
    """Within: blocks under `threshold` come from the heap and freed ones stay mapped, so a loop that allocates
    and frees the same large temporaries reuses their pages instead of faulting in fresh zeroed ones. After:
    the fixed thresholds are back and the free heap goes back to the kernel (release).

    Only for a block that makes no large long-lived blocks between its temporaries. The importance matrix's forwards
    (the model loaded before): 2,048 tokens on the 1.18B bench in 512-token batches took 42.8-45.6 s (1.2-1.9M page
    faults), 37.8-40.9 s in here (0.3M), peak 3.14-3.26 -> 3.28-3.38 GB (three alternating pairs, own process,
    2-core EPYC). Not for bitsandbytes' 4-bit load, though its loop gained more (the reference's base 25.7-26.7 ->
    19.0-19.1 s, 5.2M -> 0.4M faults): each weight's packed codes are long-lived and land in the holes its float32
    temporaries left, so the heap grows by ~40 MB a weight. In the bench export that was +2.2 GB resident during the
    load, and with a release() every second meanwhile the grown heap's free space still served the reference's
    activations later, which stayed resident: peak 4.03 -> 4.21 GB.

    Only where large_blocks_to_os fixed the thresholds (the process is lorax's): in a host program this does
    nothing. The setting is process-wide while it lasts, so other threads' blocks are heap blocks too; nothing
    but speed and residency changes."""
    if not _fixed:
        yield
        return
    _mallopt(_M_MMAP_THRESHOLD, threshold)
    _mallopt(_M_TRIM_THRESHOLD, threshold)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, _fixed["mmap"])
        _mallopt(_M_TRIM_THRESHOLD, _fixed["trim"])
        release()


def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, musl: nothing to call)."""
    return getattr(_libc(), "malloc_trim", None)


def release() -> None:
    """Return free heap pages to the OS."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ReusedBuffer(threading.local):
    """A float32 scratch buffer per thread, grown to the largest request and then reused. Under the fixed mmap
    threshold above, a block allocated per call is fresh zeroed pages every time. Whoever holds the object sets
    its lifetime: a module for the process (formats.hf.bf16_compute's widening chunks), a model for as long as
    the model lives (formats.hf.load's upcast weights)."""

    buf = None

    def take(self, elements: int):
        """A 1-d float32 tensor of `elements` values, this thread's, overwritten by the next take."""
        import torch

        if self.buf is None or self.buf.numel() < elements:
            self.buf = None  # the old one goes before the larger one comes
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                self.buf = torch.empty(elements, dtype=torch.float32)
        return self.buf[:elements]

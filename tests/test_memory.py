"""The `lorax` process hands freed mid-sized blocks back to the kernel (lorax_common.memory.large_blocks_to_os).

Each case runs in a process of its own (the setting is process-wide): one 24 MiB block is freed, which under
glibc's moving threshold makes every later block below 24 MiB a heap block; then forty 16 MiB tensors are
allocated between small long-lived ones and freed. What stays resident is measured from /proc.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator, /proc")

# resident anonymous memory of the running process, in MiB (each script below measures with it)
ANON_MIB = textwrap.dedent("""
    def anon_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    """)

WORKLOAD = ANON_MIB + textwrap.dedent("""
    import sys, torch

    def workload():
        first = torch.ones(6 * 2**20)  # 24 MiB: mmapped, and freeing it moves glibc's threshold up to 24 MiB
        del first
        before = anon_mib()
        big, keep = [], []
        for _ in range(40):
            big.append(torch.ones(4 * 2**20))  # 16 MiB, touched
            keep.append(torch.ones(1024))  # small and long-lived: sits above each big block in the heap
        del big
        print(round(anon_mib() - before))
        return 0
    """)


def residue(script: str) -> float:
    out = subprocess.run([sys.executable, "-c", WORKLOAD + textwrap.dedent(script)], capture_output=True, text=True,
                         check=True).stdout
    return float(out.split()[-1])


def test_freed_activations_stay_resident_under_glibcs_moving_threshold():
    """The fault the setting fixes, shown: 640 MiB allocated and freed, most of it still resident."""
    assert residue("workload()") > 400


def test_fixed_threshold_returns_them():
    assert residue("from lorax_common.memory import large_blocks_to_os\n"
                   "assert large_blocks_to_os()\nworkload()") < 50


def test_the_lorax_command_fixes_it_before_any_command():
    """exporter.cli.main.run (the console script and `python -m exporter.cli`) sets it before main runs."""
    assert residue("import exporter.cli.main as m\nm.main = workload\nm.run()") < 50


def test_main_in_process_leaves_the_allocator_alone():
    """main() called by a host program (tests, notebooks) changes no process-wide setting."""
    assert residue("from exporter.cli.main import main\nmain(['--help'])\nworkload()") > 400



REUSE = ANON_MIB + textwrap.dedent("""
    import resource, torch
    from lorax_common.memory import heap_reuse, large_blocks_to_os

    def faults(rounds=8):
        # ten 16 MiB blocks alive at once, touched, then all freed: bitsandbytes' temporaries, weight after weight
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            blocks = [torch.ones(4 * 2**20) for _ in range(10)]
            del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    assert large_blocks_to_os()
    before_mib = anon_mib()
    outside = faults()
    with heap_reuse():
        inside = faults()
        held = anon_mib() - before_mib
    print(outside, inside, round(held), round(anon_mib() - before_mib))
    """)


def test_heap_reuse_reuses_pages_inside_and_hands_them_back_after():
    """Outside, every round is fresh pages (8 rounds x 40,960 pages of 4 KiB); inside, the heap grows over the
    first rounds (~2 here: glibc places a round's blocks around the last's) and the rest reuse its pages, which
    stay resident until the block ends and release() hands them back."""
    out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, check=True).stdout
    outside, inside, held, residue = (int(v) for v in out.split())
    assert outside > 8 * 40_000
    assert inside < 3 * 40_960
    assert held > 150 and residue < 50


def _spied(monkeypatch, fixed):
    from lorax_common import memory

    calls = []
    monkeypatch.setattr(memory, "_fixed", fixed)
    monkeypatch.setattr(memory, "_mallopt", lambda *a: calls.append(a) or True)
    monkeypatch.setattr(memory, "release", lambda: calls.append("release"))
    return memory, calls


def test_heap_reuse_puts_the_fixed_thresholds_back_even_on_error(monkeypatch):
    memory, calls = _spied(monkeypatch, {"mmap": 8 << 20, "trim": 128 << 10})
    with pytest.raises(RuntimeError), memory.heap_reuse(64 << 20):
        raise RuntimeError("a load failed")
    mmap, trim = memory._M_MMAP_THRESHOLD, memory._M_TRIM_THRESHOLD
    assert calls == [(mmap, 64 << 20), (trim, 64 << 20), (mmap, 8 << 20), (trim, 128 << 10), "release"]


def test_heap_reuse_leaves_a_host_programs_allocator_alone(monkeypatch):
    """In a process whose allocator lorax does not own (large_blocks_to_os never ran), heap_reuse calls no
    mallopt at all."""
    memory, calls = _spied(monkeypatch, {})
    with memory.heap_reuse():
        pass
    assert calls == []


def test_the_importance_matrix_calibrates_inside_heap_reuse(tiny_model_dir, monkeypatch):
    """collect_imatrix's forwards run in the block (their activations die batch by batch), and the model they
    run on is loaded before it (long-lived blocks inside would fragment the heap: heap_reuse's docstring)."""
    import contextlib

    from formats.gguf import imatrix as im
    from formats.hf import load as hf_load
    from lorax_common import memory

    seen, real = [], memory.heap_reuse
    real_forward = im.calibration_forward

    @contextlib.contextmanager
    def spy(*a, **kw):
        seen.append("enter")
        with real(*a, **kw):
            yield
        seen.append("exit")

    def loader(real_load):
        return lambda *a, **kw: (seen.append("load"), real_load(*a, **kw))[1]

    monkeypatch.setattr(memory, "heap_reuse", spy)
    monkeypatch.setattr(im, "calibration_forward", lambda *a: (seen.append("forward"), real_forward(*a))[1])
    for name in ("load_causal_lm", "load_float32_compute"):
        monkeypatch.setattr(hf_load, name, loader(getattr(hf_load, name)))
    imx = im.collect_imatrix(tiny_model_dir, [[1, 5, 9, 13, 2], [3, 4, 5]], token_budget=64, progress=False)
    assert seen[-3:] == ["enter", "forward", "exit"] and "load" in seen[:-3] and imx.sums

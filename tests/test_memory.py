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

WORKLOAD = textwrap.dedent("""
    import sys, torch

    def anon_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024

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

"""Stage timing of one command, for report.json and the one-line summary `lorax export` ends with.

    clock = Stopwatch()
    with clock("merge"):
        merge_adapter(...)
    clock.summary()      # 'merge 12.1 s · gguf 30.4 s · gate 95.0 s · total 138 s · peak RSS 1.8 GB'

Owned by the caller and passed down (no process-wide registry); the peak RSS is the process's own high-water
mark (getrusage), which covers every stage run so far.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def peak_rss_mib() -> float:
    """The process's peak resident set so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


@dataclass
class Stopwatch:
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds, in the order stages began
    started: float = field(default_factory=time.perf_counter)
    # stage -> the process's high-water mark when it ended (MiB): the first stage that shows the peak set it
    rss_after: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - t0, 2)
            self.rss_after[stage] = round(peak_rss_mib())

    def add(self, stages: dict[str, float], rss_after: dict[str, float] | None = None) -> None:
        """Stages another Stopwatch of this process timed (with their high-water marks, when given)."""
        for k, v in stages.items():
            self.seconds[k] = round(self.seconds.get(k, 0.0) + v, 2)
        self.rss_after.update(rss_after or {})

    def as_dict(self) -> dict:
        return {"stages": dict(self.seconds), "total": round(time.perf_counter() - self.started, 2),
                "peak_rss_mib": round(peak_rss_mib()), "peak_rss_after_mib": dict(self.rss_after)}

    def summary(self) -> str:
        return summary_line(self.as_dict())


def summary_line(timing: dict) -> str:
    """One line from `Stopwatch.as_dict()` (also as read back from report.json)."""
    parts = [f"{k} {v:.1f} s" for k, v in timing["stages"].items()]
    return " · ".join([*parts, f"total {timing['total']:.0f} s", f"peak RSS {timing['peak_rss_mib'] / 1024:.2f} GiB"])

"""How busy the machine is, and how much of it other processes took during a measurement.

The development box is shared: other users' jobs distort every timing. The benchmarks wait for
idle CPUs before a measurement and record others' CPU time during it (/proc, Linux only).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

DISTURBED = 0.15  # others used more than this share of the machine's CPU time: measure again


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_idle(max_wait: float, threshold: float = 0.15, window: float = 2.0) -> dict:
    """Wait (up to max_wait seconds) until the machine's CPUs are less than `threshold` busy."""
    started = time.perf_counter()
    while True:
        b0, t0 = cpu_jiffies()
        time.sleep(window)
        b1, t1 = cpu_jiffies()
        busy = (b1 - b0) / max(1, t1 - t0)
        waited = time.perf_counter() - started
        if busy < threshold or waited >= max_wait:
            return {"busy_fraction_before": round(busy, 3), "waited_s": round(waited, 1)}


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime in jiffies) of every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def descendants(parents: dict[int, int], roots: set[int]) -> set[int]:
    """`roots` and every process below them, from a pid -> parent pid table."""
    ours = set(roots)
    while new := {pid for pid, parent in parents.items() if parent in ours} - ours:
        ours |= new
    return ours


class CpuSampler(threading.Thread):
    """Samples /proc twice a second: CPU used by processes that are not ours (not descendants of
    this process at any sample, which also covers Ray daemons orphaned when a build exits).
    A lower bound: a foreign process born and dead between two samples is missed."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.stop_event = interval, threading.Event()
        self.ours: set[int] = {os.getpid()}
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.foreign_names: dict[int, str] = {}
        self._sample(initial=True)

    def _sample(self, initial: bool = False) -> None:
        table = _proc_table()
        self.ours = descendants({pid: ppid for pid, (ppid, _) in table.items()}, self.ours)
        for pid, (_, cpu) in table.items():
            if pid not in self.first and pid not in self.ours:
                self.foreign_names[pid] = _cmdline(pid)
            self.first.setdefault(pid, cpu if initial else 0)
            self.last[pid] = cpu

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self._sample()

    def finish(self) -> dict:
        self.stop_event.set()
        self.join()
        self._sample()
        hz = os.sysconf("SC_CLK_TCK")
        foreign = {pid: (self.last[pid] - self.first[pid]) / hz for pid in self.last if pid not in self.ours}
        top = sorted(((cpu, pid) for pid, cpu in foreign.items() if cpu >= 0.5), reverse=True)[:5]
        return {"foreign_cpu_s": round(sum(max(0.0, v) for v in foreign.values()), 1),
                "foreign_top": [f"{self.foreign_names.get(pid) or _cmdline(pid)} {cpu:.1f}s" for cpu, pid in top]}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80].strip()
    except OSError:
        return f"pid {pid} (exited)"


class Phase:
    """Waits for an idle machine, then records its CPU use during one measurement and how much
    of that was others' (other users' jobs on a shared machine distort every number here)."""

    def __init__(self, max_wait: float):
        self.max_wait = max_wait

    def __enter__(self) -> "Phase":
        self.info = wait_idle(self.max_wait) if self.max_wait > 0 else {}
        self.jiffies, self.t0 = cpu_jiffies(), time.perf_counter()
        self.sampler = CpuSampler()
        self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        foreign = self.sampler.finish()
        hz = os.sysconf("SC_CLK_TCK")
        busy = (cpu_jiffies()[0] - self.jiffies[0]) / hz
        seconds = time.perf_counter() - self.t0
        self.info.update({"seconds": round(seconds, 2), "machine_cpu_s": round(busy, 1),
                          "machine_busy_fraction": round(busy / (seconds * (os.cpu_count() or 1)), 3),
                          **foreign,
                          "foreign_fraction_of_machine": round(foreign["foreign_cpu_s"] / (seconds * (os.cpu_count() or 1)), 3)})


class MemorySampler(threading.Thread):
    """Peak memory of every process below this one, sampled every `interval` s: VmRSS (which
    counts the shared pages a process maps, such as Ray's object store) and RssAnon (its private
    memory, the firmer figure), in bytes per pid, with whether the pid is a direct child (the
    command a benchmark started) and whether it is a Ray worker ("ray::...")."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.stop_event = interval, threading.Event()
        self.peaks: dict[int, dict[str, int]] = {}
        self.direct: set[int] = set()
        self.ray_workers: set[int] = set()
        self.ray_anon_total = 0  # the largest sum of the Ray workers' RssAnon at one sample

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        parents = {pid: ppid for pid, (ppid, _) in _proc_table().items()}
        ray_anon = 0
        for pid in descendants(parents, {os.getpid()}) - {os.getpid()}:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    ray_worker = f.read(5).startswith(b"ray::")
                with open(f"/proc/{pid}/status") as f:
                    status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if "RSS" in line.upper()}
            except (OSError, ValueError):
                continue
            peak = self.peaks.setdefault(pid, {"VmRSS": 0, "RssAnon": 0})
            for name in peak:
                peak[name] = max(peak[name], status.get(name, 0))
            self.direct |= {pid} if parents[pid] == os.getpid() else set()
            self.ray_workers |= {pid} if ray_worker else set()
            ray_anon += status.get("RssAnon", 0) if ray_worker else 0
        self.ray_anon_total = max(self.ray_anon_total, ray_anon)

    def finish(self) -> "MemorySampler":
        self.stop_event.set()
        self.join()
        return self

    def largest_mb(self, pids: set[int], field: str) -> int:
        """The largest peak of `field` (VmRSS or RssAnon) among `pids`, in MB."""
        return round(max((self.peaks[pid][field] for pid in pids & self.peaks.keys()), default=0) / 2 ** 20)

    def ray_worker_peaks(self) -> dict[str, int]:
        """The Ray workers' largest VmRSS and RssAnon, and their largest RssAnon together, in MB."""
        return {"worker_peak_rss_mb": self.largest_mb(self.ray_workers, "VmRSS"),
                "worker_peak_anon_mb": self.largest_mb(self.ray_workers, "RssAnon"),
                "worker_peak_anon_total_mb": round(self.ray_anon_total / 2 ** 20)}

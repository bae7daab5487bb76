"""CPU seconds the server processes spend during a run, from /proc/<pid>/stat.

Counts utime + stime of each process (not of its reaped children: a server's worker processes
are counted when they match the pattern themselves). A process that starts during the run counts
from zero; one that exits during the run counts up to the last reading taken while it lived,
which is the start reading, so short-lived processes are undercounted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def read_stat(pid: int, proc: Path = PROC) -> tuple[str, int] | None:
    """(command name, utime + stime in clock ticks), or None when the process is gone."""
    try:
        raw = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name sits in parentheses and may itself hold spaces and ')'.
    open_paren, close_paren = raw.find("("), raw.rfind(")")
    fields = raw[close_paren + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return raw[open_paren + 1 : close_paren], int(fields[11]) + int(fields[12])


def _parent(pid: int, proc: Path) -> int | None:
    try:
        raw = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rfind(")") + 2 :].split()[1])


def _ancestors(pid: int, proc: Path) -> set[int]:
    """This process and its ancestors, whose command lines repeat the pattern being searched."""
    seen = {pid}
    current: int | None = pid
    while current is not None and current > 1:
        current = _parent(current, proc)
        if current is not None:
            seen.add(current)
    return seen


def find_pids(pattern: str, proc: Path = PROC, self_pid: int | None = None) -> list[int]:
    """Processes whose command line matches the regular expression, excluding this one's lineage."""
    regex = re.compile(pattern)
    exclude = _ancestors(os.getpid() if self_pid is None else self_pid, proc)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmdline and regex.search(cmdline):
            found.append(int(entry.name))
    return sorted(found)


@dataclass(frozen=True)
class ProcessCpu:
    pid: int
    name: str
    seconds: float


@dataclass(frozen=True)
class CpuReport:
    seconds: float
    processes: list[ProcessCpu]


class CpuMeter:
    """Reads the processes at start() and at stop(); a pattern is matched again at stop()."""

    def __init__(self, pids: list[int], pattern: str | None = None, proc: Path = PROC) -> None:
        self.pids = list(pids)
        self.pattern = pattern
        self.proc = proc
        self._tick = float(os.sysconf("SC_CLK_TCK"))
        self._start: dict[int, tuple[str, int]] = {}

    def _targets(self) -> set[int]:
        found = set(self.pids)
        if self.pattern:
            found.update(find_pids(self.pattern, self.proc))
        return found

    def _read(self, pids: set[int]) -> dict[int, tuple[str, int]]:
        return {pid: stat for pid in pids if (stat := read_stat(pid, self.proc)) is not None}

    def start(self) -> None:
        self._start = self._read(self._targets())

    def stop(self) -> CpuReport:
        end = self._read(self._targets() | set(self._start))
        processes = []
        for pid in sorted(set(self._start) | set(end)):
            name, before = self._start.get(pid, ("", 0))
            name, after = end.get(pid, (name, before))
            processes.append(ProcessCpu(pid, name, (after - before) / self._tick))
        return CpuReport(sum(p.seconds for p in processes), processes)

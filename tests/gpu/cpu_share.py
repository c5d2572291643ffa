"""Where a serving run's CPU time goes (GPU machine, stdlib only): snapshots of /proc before and after a bench, then
the CPU time per request of Triton and of its Python-backend stubs, of the whole machine (the rest: the bench's
clients, which have exited by the second snapshot, and anything else) and how busy its cores were.

    python3 tests/gpu/cpu_share.py snapshot FILE
    python3 tests/gpu/cpu_share.py diff BEFORE AFTER REQUESTS [--json OUT]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
GROUPS = (("stub", "triton_python_backend_stub"), ("tritonserver", "tritonserver"))


def group_of(command: str) -> str | None:
    return next((name for name, marker in GROUPS if marker in command), None)


def processes() -> dict[str, dict]:
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        group = group_of(command)
        if group:  # utime, stime: fields 14, 15 of stat (11, 12 after the command)
            found[pid] = {"group": group, "cpu_s": (int(fields[11]) + int(fields[12])) / TICKS}
    return found


def machine() -> dict[str, float]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return {"busy_s": (sum(values) - idle) / TICKS, "idle_s": idle / TICKS, "cores": os.cpu_count() or 1}


def snapshot(path: str) -> None:
    Path(path).write_text(json.dumps({"machine": machine(), "processes": processes()}))


def diff(before_path: str, after_path: str, requests: int) -> dict:
    before, after = (json.loads(Path(p).read_text()) for p in (before_path, after_path))
    per_group: dict[str, float] = {}
    for pid, proc in after["processes"].items():  # a process born meanwhile started from 0
        start = before["processes"].get(pid, {}).get("cpu_s", 0.0)
        per_group[proc["group"]] = per_group.get(proc["group"], 0.0) + proc["cpu_s"] - start
    busy = after["machine"]["busy_s"] - before["machine"]["busy_s"]
    idle = after["machine"]["idle_s"] - before["machine"]["idle_s"]
    return {"requests": requests, "machine_busy_fraction": busy / max(busy + idle, 1e-9),
            "cores": after["machine"]["cores"],
            "us_per_request": {**{g: 1e6 * s / max(requests, 1) for g, s in sorted(per_group.items())},
                               "rest": 1e6 * (busy - sum(per_group.values())) / max(requests, 1)}}


def main(argv: list[str]) -> int:
    if argv[0] == "snapshot":
        snapshot(argv[1])
    else:
        report = diff(argv[1], argv[2], int(argv[3]))
        print(json.dumps(report, indent=1))
        if "--json" in argv:
            Path(argv[argv.index("--json") + 1]).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

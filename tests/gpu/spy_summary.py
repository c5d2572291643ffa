"""Where each thread's samples go in a py-spy raw recording (`py-spy record --threads --format raw`): per thread
(pool threads folded by name), its share of the samples, the innermost frames it was in and the innermost trtnet
frames (the code of ours that called whatever took the time).

    python tests/gpu/spy_summary.py RECORDING.txt [--top 12]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict


def thread_name(first: str) -> str:
    """'thread (123): trtnet-decode_3 …' → 'trtnet-decode'; a thread without a name keeps its number."""
    name = first.split(":", 1)[1].strip() if ":" in first else first
    return re.sub(r"_\d+$", "", name.split(" (")[0]) or first


def parse(path: str) -> dict[str, list[tuple[list[str], int]]]:
    threads: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    with open(path, encoding="utf-8", errors="replace") as recording:
        for line in recording:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            threads[thread_name(frames[0])].append((frames[1:], int(count)))
    return threads


def ours(frames: list[str]) -> str:
    inner = [f for f in frames if "trtnet/" in f or "tests/gpu/" in f]
    return inner[-1] if inner else "(no trtnet frame)"


def summary(path: str, top: int) -> str:
    threads = parse(path)
    total = sum(c for samples in threads.values() for _, c in samples) or 1
    lines = [f"{path}: {total} samples"]
    for name, samples in sorted(threads.items(), key=lambda kv: -sum(c for _, c in kv[1])):
        n = sum(c for _, c in samples)
        lines.append(f"\n== {name}: {n} samples ({n / total:.0%})")
        for title, key in (("innermost frame", lambda f: f[-1] if f else "?"), ("innermost trtnet frame", ours)):
            counts = Counter()
            for frames, c in samples:
                counts[key(frames)] += c
            lines.append(f"  {title}:")
            lines += [f"    {c / n:6.1%}  {frame}" for frame, c in counts.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recording")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    print(summary(args.recording, args.top))


if __name__ == "__main__":
    main()

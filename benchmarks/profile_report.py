"""Where a proxy worker's CPU goes, from the files `run.py --profile DIR` writes.

    python benchmarks/profile_report.py DIR/pub_1c_100b.txt [--top 20]

For each scenario, three inputs recorded during the same runs:
- `NAME.json`: the worker's CPU seconds (psutil) and the messages (or cycles) of those runs;
- `NAME.perf.json` (when `perf` is installed): perf's split of that CPU by binary: the Python
  interpreter, the kernel (socket reads and writes, epoll, accept, close), uvloop, libc (memcpy,
  malloc). This is true on-CPU time;
- `NAME.txt`: py-spy's collapsed Python stacks. py-spy counts a thread that is runnable but
  waiting for a CPU as busy, so on this loaded 2-core machine the time right after a socket
  write (which wakes the peer, which may then take the CPU) is overcounted. Samples whose
  innermost frame is in Python code are reliable; those in uvloop's C code or inside
  `transport.write` (`FramedProtocol.flush`'s own time) are "C and kernel".

The report gives the layer split (perf), then the Python functions by self time, as a share of
the samples in Python code and as µs per message (that share of the interpreter's part of the
CPU), then the same by total time (the function and what it calls).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

LINE = re.compile(r"^(.*) (\d+)$")
C_LEAF = "[C: uvloop, the kernel, transport.write]"
#: perf's binaries that run Python code (the interpreter and its C modules), the rest is C.
PYTHON_DSOS = ("libpython", "_struct", "_asyncio", "python3", "_json", "math", "_heapq")


def function_name(frame: str) -> str:
    """'data_received (amqproxy_mp/amqp/transport.py:57)' -> 'transport.py:data_received'."""
    match = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    name, path = match[1], match[2]
    short = "/".join(path.split("/")[-2:]) if "amqproxy_mp" in path else path.split("/")[-1]
    return f"{short}:{name}"


def load_stacks(path: Path) -> list[tuple[list[str], int]]:
    """The worker's event-loop stacks (below Worker.run), innermost frame last."""
    stacks = []
    for line in path.read_text().splitlines():
        match = LINE.match(line)
        if not match:
            continue
        frames = [function_name(f) for f in match[1].split(";") if f]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        for i, name in enumerate(frames):
            if name.endswith("Worker.run"):
                frames = frames[i + 1 :]
                break
        else:
            continue  # not the worker's loop (the master, start-up)
        if frames and frames[0].endswith("Handle._run"):
            frames = frames[1:]
        if not frames or frames[-1].endswith("FramedProtocol.flush"):
            frames = [*frames, C_LEAF]  # inside transport.write (the send syscall)
        stacks.append((frames, int(match[2])))
    return stacks


def layer_split(perf: dict[str, float]) -> dict[str, float]:
    total = sum(perf.values()) or 1.0
    layers: dict[str, float] = collections.defaultdict(float)
    for dso, share in perf.items():
        if dso.startswith("[kernel"):
            layer = "kernel (syscalls: socket I/O, epoll, accept, close)"
        elif any(name in dso for name in PYTHON_DSOS):
            layer = "Python interpreter (the proxy's Python code)"
        elif "loop.cpython" in dso:
            layer = "uvloop (C)"
        elif "libc" in dso:
            layer = "libc (memcpy, malloc)"
        else:
            layer = "other"
        layers[layer] += share / total * 100
    return dict(sorted(layers.items(), key=lambda kv: -kv[1]))


def summarise(path: Path, top: int = 20) -> str:
    stacks = load_stacks(path)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    perf_path = path.with_suffix(".perf.json")
    perf = json.loads(perf_path.read_text()) if perf_path.exists() else {}
    per_msg = meta["proxy_cpu_s"] / meta["messages"] * 1e6 if meta.get("messages") else None
    lines = [f"{path.stem}:"]
    if per_msg is not None:
        lines.append(
            f"  worker CPU {meta['proxy_cpu_s']:.2f} s for {meta['messages']} messages/cycles"
            f" = {per_msg:.1f} µs each"
        )
    python_share = None
    if perf:
        layers = layer_split(perf)
        lines.append("  perf, by layer:")
        for layer, share in layers.items():
            us = f" = {share / 100 * per_msg:.1f} µs" if per_msg else ""
            lines.append(f"    {share:5.1f} %{us}  {layer}")
        python_share = layers.get("Python interpreter (the proxy's Python code)", 0.0) / 100
    python_samples = sum(n for frames, n in stacks if frames[-1] != C_LEAF)
    all_samples = sum(n for _, n in stacks)
    if not python_samples:
        return "\n".join([*lines, "  no py-spy samples"])
    lines.append(
        f"  py-spy: {all_samples} samples, {python_samples} in Python code "
        f"({python_samples / all_samples * 100:.0f} %; the rest in C or waiting for a CPU)"
    )
    us_per_sample = (
        python_share * per_msg / python_samples if python_share and per_msg is not None else None
    )
    self_count: collections.Counter[str] = collections.Counter()
    total_count: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        if frames[-1] == C_LEAF:
            continue
        self_count[frames[-1]] += n
        for name in set(frames):
            total_count[name] += n
    for title, counter in (("self", self_count), ("total (with callees)", total_count)):
        lines += ["", f"  Python code by {title}:", f"    {'%':>5} {'µs/msg':>7}  function"]
        for name, n in counter.most_common(top):
            us = f"{n * us_per_sample:7.2f}" if us_per_sample else f"{'':7}"
            lines.append(f"    {n / python_samples * 100:5.1f} {us}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="where a proxy worker's CPU goes")
    parser.add_argument("files", nargs="+", type=Path, help="DIR/NAME.txt from run.py --profile")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    for path in args.files:
        print(summarise(path, args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

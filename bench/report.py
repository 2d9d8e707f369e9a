"""Shared helpers of the benchmarks: the machine's CPU name, one section of docs/BENCHMARKS.md."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or the platform's machine type where that is absent."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def update_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the `## title` section of a Markdown file, leaving the others alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    head = f"## {title}"
    if head in lines:
        start = lines.index(head)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = lines[:start] + [head, "", body, ""] + lines[end:]
    else:
        new = lines + ["", head, "", body]
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def publish(title: str, body: str, write: bool, path: Path | None = None) -> None:
    """Print a benchmark's section and, unless told not to, replace it in docs/BENCHMARKS.md."""
    print(body)
    if write:
        update_section(path or Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md", title, body)

"""What the bench/ scripts share: the machine line of a results section and the writer of ``bench/results.md``.

Each script owns one section of ``results.md``, headed ``## <name>`` after ``bench/<name>.py``; writing it replaces
that section and leaves the others alone. The scripts run from the repository root (``python bench/<name>.py``), so
this module is importable as ``_common``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from busbench.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results.md"
HEADER = "# busbench benchmark results\n\nEach section is written by the script named in its heading (`bench/<name>.py`).\n"


def version(module: str) -> str:
    """``module``'s ``__version__`` (``?`` when it has none or is not installed)."""
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except ImportError:
        return "?"


def load_average() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine(libraries: Sequence[tuple[str, str]] = (), notes: str = "") -> str:
    """``Machine: ...`` line: platform, CPUs, the load average now, Python and each ``(label, module)``'s version.

    ``notes`` goes after the CPU count (e.g. the device, OpenCV's thread count).
    """
    cpus = f"{os.cpu_count()} CPUs"
    if notes:
        cpus += f", {notes}"
    libs = "".join(f", {label} {version(module)}" for label, module in libraries)
    return (
        f"Machine: {platform.platform()}, {platform.machine()}, {cpus} (1-min load average {load_average():.1f} at "
        f"the end; other jobs sharing the CPUs make wall times noisy); Python {platform.python_version()}{libs}."
    )


def heading(name: str) -> list[str]:
    """The first lines of a section: its heading and the command that wrote it, with the UTC time."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python", f"bench/{name}.py", *sys.argv[1:]])
    return [f"## {name}", "", f"`{command}` — {when}", ""]


def write_section(name: str, text: str, results: Path = RESULTS) -> None:
    """Put ``text`` in place of the ``## <name>`` section of ``results`` (or append it); keep every other section."""
    current = results.read_text(encoding="utf-8") if results.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", flags=re.DOTALL | re.MULTILINE)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    atomic_write_text(results, updated.rstrip("\n") + "\n")
    print(f"written to {results}")

"""tcmalloc for training on Linux, when it is installed.

A CPU training step allocates and frees thousands of activation-sized tensors. glibc's malloc
hands large blocks back to the kernel and takes them again, paying page faults each time;
tcmalloc keeps them: steps are faster and peak RSS lower (measured in
docs/benchmarks/speed-and-memory.md; jemalloc gained nothing there). An allocator has to be in place before the process
allocates anything, so `phitune train` started as a program re-executes itself once with
tcmalloc in LD_PRELOAD (the process keeps its id; children such as a
distributed run's workers inherit it). Debian and Ubuntu: `apt install libtcmalloc-minimal4`
(or google-perftools). `PHITUNE_ALLOCATOR=system` keeps glibc's.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

ENV = "PHITUNE_ALLOCATOR"
CANDIDATES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")


def tcmalloc() -> str | None:
    """The path of an installed tcmalloc, or None."""
    for name in CANDIDATES:
        for folder in LIBRARY_DIRS:
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return found or None


def reexec_with_tcmalloc(command: list[str]) -> None:
    """Replace this process with `command` under tcmalloc, unless it runs under it already, tcmalloc
    is not installed, the platform is not Linux, or PHITUNE_ALLOCATOR says otherwise. Returns
    only when nothing was done."""
    if sys.platform != "linux" or os.environ.get(ENV, "auto") != "auto":
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload or "jemalloc" in preload:
        return  # the user chose an allocator
    library = tcmalloc()
    if library is None:
        return
    env = dict(os.environ, LD_PRELOAD=f"{library} {preload}".strip(), **{ENV: "tcmalloc"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def in_use() -> str:
    """The allocator this process runs with: tcmalloc, jemalloc or glibc (run.json records it)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return next((name for name in ("tcmalloc", "jemalloc") if name in maps), "glibc")

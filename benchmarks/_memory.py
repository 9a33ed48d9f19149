"""Peak memory of the current process, for the benchmark children."""


def peak_rss_mb() -> float:
    """VmHWM of this process image. Not ru_maxrss: on Linux that carries the parent's peak across
    fork + exec, which would charge the benchmark driver's memory to every child."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

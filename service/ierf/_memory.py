"""How much memory this process may still allocate, for refusing an answer that could not fit before it
is allocated (on Linux, pages are lent lazily and the OOM killer ends the process while they are filled)."""

from __future__ import annotations


def memory_available() -> int | None:
    """Bytes this process may still allocate: the system's MemAvailable, and in a container the cgroup's
    limit less its usage (reclaimable page cache counted as free), whichever is less; None off Linux."""
    figures = [_meminfo_available(), _cgroup_available()]
    known = [f for f in figures if f is not None]
    return min(known) if known else None


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return None


def _meminfo_available() -> int | None:
    text = _read("/proc/meminfo")
    for line in (text or "").splitlines():
        fields = line.split()
        if fields[:1] == ["MemAvailable:"] and len(fields) > 1 and fields[1].isdigit():
            return int(fields[1]) * 1024
    return None


def _cgroup_available() -> int | None:
    # cgroup v2, then v1 (a v1 limit near 2**63 means none); the namespace shows the container's own group
    for limit_file, usage_file, stat_file, inactive in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "/sys/fs/cgroup/memory/memory.stat",
            "total_inactive_file",
        ),
    ):
        limit, usage = _read(limit_file), _read(usage_file)
        if limit is None or usage is None:
            continue
        limit, usage = limit.strip(), usage.strip()
        if not limit.isdigit() or not usage.isdigit() or int(limit) >= 2**60:
            return None  # "max", or no limit
        stats = dict(line.split()[:2] for line in (_read(stat_file) or "").splitlines() if len(line.split()) >= 2)
        reclaimable = int(stats.get(inactive, "0")) if stats.get(inactive, "0").isdigit() else 0
        return max(0, int(limit) - int(usage) + reclaimable)
    return None

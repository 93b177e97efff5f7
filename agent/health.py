"""Readings of the box the agent runs on: disk, temperature, throttling, clock sync.

Each reading is what the kernel exposes and nothing more: a reading the box does not
offer (no thermal zone in a container, no Pi firmware on a PC) is left out, never
guessed. Every function takes ``root`` so tests can point it at a folder laid out like
``/sys`` and ``/run``. Used by the agent's health messages and by ``datamux doctor``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "PI_THROTTLE_BITS",
    "clock_sync",
    "cpu_temperature",
    "disk_space",
    "system_readings",
    "throttling",
]

ROOT = Path("/")

# Bits of the Pi firmware's get_throttled word (the same as `vcgencmd get_throttled`).
PI_THROTTLE_BITS = {
    0: "under-voltage",
    1: "arm frequency capped",
    2: "throttled",
    3: "soft temperature limit",
}
_OCCURRED_SHIFT = 16  # bits 16..19: the same conditions, "has occurred since boot"
_TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


def disk_space(folder: Path) -> dict[str, float]:
    """Free and total MB of the file system holding ``folder`` (or its nearest parent)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return {}
    return {
        "disk_free_mb": round(usage.free / (1 << 20), 1),
        "disk_total_mb": round(usage.total / (1 << 20), 1),
    }


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def cpu_temperature(root: Path = ROOT) -> dict[str, Any]:
    """The CPU's temperature in °C from ``/sys/class/thermal`` (the hottest CPU zone).

    Zones named like a CPU (``cpu-thermal`` on a Pi, ``x86_pkg_temp``, ``soc``) are
    preferred; without one, the hottest zone of all.
    """
    zones = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        kind, value = _read(zone / "type") or "", _read(zone / "temp")
        if value is not None and value.lstrip("-").isdigit():
            zones.append((kind, int(value) / 1000.0))
    if not zones:
        return {}
    cpu = [z for z in zones if any(w in z[0].lower() for w in ("cpu", "x86_pkg", "soc"))]
    kind, celsius = max(cpu or zones, key=lambda z: z[1])
    return {"cpu_temp_c": round(celsius, 1), "thermal_zone": kind}


def throttling(root: Path = ROOT) -> dict[str, Any]:
    """Throttling the kernel reports: the Pi firmware's flags, or x86 throttle counts."""
    word = _read(root / "sys/devices/platform/soc/soc:firmware/get_throttled")
    if word is not None:
        try:
            bits = int(word, 16)
        except ValueError:
            return {}
        now = [name for bit, name in PI_THROTTLE_BITS.items() if bits & (1 << bit)]
        before = [
            name for bit, name in PI_THROTTLE_BITS.items() if bits & (1 << (bit + _OCCURRED_SHIFT))
        ]
        return {"throttled": hex(bits), "throttled_now": now, "throttled_since_boot": before}
    counts = []
    for path in (root / "sys/devices/system/cpu").glob("cpu*/thermal_throttle/package_*count"):
        value = _read(path)
        if value is not None and value.isdigit():
            counts.append(int(value))
    if counts:
        return {"throttle_events": max(counts)}
    return {}


class _Timex(ctypes.Structure):
    # struct timex (linux/timex.h) up to the fields read here; the kernel writes more,
    # so the padding leaves room for the rest of the structure.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),
    ]


def _adjtimex() -> tuple[int, int] | None:
    """(clock state, maximum error in µs) from adjtimex(2) with no changes, or None."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        timex = _Timex()
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return None
    if state < 0:  # EPERM under a seccomp filter without @clock: fall back
        return None
    return state, int(timex.maxerror)


def clock_sync(root: Path = ROOT, *, use_kernel: bool = True) -> dict[str, Any]:
    """Whether the system clock is synchronised (NTP/PTP), and how that is known.

    The kernel's view (adjtimex: set by timesyncd, chrony and ntpd alike) comes first;
    under a filter that forbids it, systemd-timesyncd's flag file.
    """
    if use_kernel and root == ROOT:
        kernel = _adjtimex()
        if kernel is not None:
            state, max_error_us = kernel
            synced = state != _TIME_ERROR
            out: dict[str, Any] = {"clock_synced": synced, "clock_source": "adjtimex"}
            if synced:
                out["clock_max_error_ms"] = round(max_error_us / 1000.0, 1)
            return out
    if (root / "run/systemd/timesync/synchronized").exists():
        return {"clock_synced": True, "clock_source": "timesyncd"}
    if (root / "run/systemd/timesync").is_dir():
        return {"clock_synced": False, "clock_source": "timesyncd"}
    return {"clock_synced": None, "clock_source": "unknown"}


def _memory(root: Path) -> dict[str, Any]:
    text = _read(root / "proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return {"mem_available_mb": round(int(parts[1]) / 1024, 1)}
    return {}


def system_readings(spool_dir: Path, root: Path = ROOT) -> dict[str, Any]:
    """Every reading at once, flat, for the health message."""
    out: dict[str, Any] = {}
    out.update(disk_space(spool_dir))
    out.update(cpu_temperature(root))
    out.update(throttling(root))
    out.update(clock_sync(root))
    out.update(_memory(root))
    if root == ROOT and hasattr(os, "getloadavg"):
        with contextlib.suppress(OSError):
            out["load_1m"] = round(os.getloadavg()[0], 2)
    return out

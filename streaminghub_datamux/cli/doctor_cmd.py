"""``datamux doctor``: check this box for what the agent needs, and say how to fix each gap.

Each check prints one line, ``ok``, ``warn`` or ``FAIL``, with what it found; problems
add a ``fix:`` line. The exit code is 1 when any check failed (warnings alone: 0), so it
fits a provisioning script. Checks: the configured drivers (liblsl for LSL, the BLE
adapter and D-Bus, serial ports and group ``dialout``), the broker (reachable, TLS,
login), clock sync and free disk for the spool.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..agent.health import clock_sync, disk_space
from ..brokerprobe import diagnose_broker
from ..config import Config, load_config
from ..dirs import state_dir
from ..drivers.registry import BUILTIN, DriverLoadError, load_driver
from ..errors import ConfigError, DatamuxError
from ..mqttio import BrokerSettings, MqttLink
from .serve_cmd import broker_flags, broker_overrides

__all__ = ["Check", "register", "run_checks"]

MIN_FREE_MB = 200.0  # below this the spool (agent.spool_max_mb) may not fit
DBUS_SOCKET = Path("/run/dbus/system_bus_socket")
BLUETOOTH_CLASS = Path("/sys/class/bluetooth")


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``level`` is ok, warn or fail."""

    name: str
    level: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[self.level]
        text = f"[{mark}] {self.name}: {self.detail}"
        return f"{text}\n       fix: {self.fix}" if self.fix else text

    def to_json(self) -> dict[str, str]:
        return {"check": self.name, "level": self.level, "detail": self.detail, "fix": self.fix}


def _enabled(config: Config) -> list[str]:
    enabled = str(config.get("drivers.enabled"))
    if enabled.strip().lower() == "auto":
        return list(BUILTIN)
    return [n.strip() for n in enabled.split(",") if n.strip()]


def _in_group(name: str) -> bool | None:
    """Whether this process is in group ``name``; None when the group does not exist."""
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        return None
    return gid in os.getgroups() or gid == os.getgid()


def check_lsl(explicit: bool) -> Check:
    try:
        load_driver("lsl")
    except DriverLoadError as exc:
        level = "fail" if explicit or exc.installed else "warn"
        return Check("lsl", level, exc.reason, exc.fix)
    pylsl = importlib.import_module("pylsl")
    return Check("lsl", "ok", f"liblsl {pylsl.library_version()} loads")


def check_ble(explicit: bool) -> Check:
    try:
        load_driver("ble")
    except DriverLoadError as exc:
        return Check("ble", "fail" if explicit else "warn", exc.reason, exc.fix)
    bad = "fail" if explicit else "warn"
    if not DBUS_SOCKET.exists():
        return Check("ble", bad, f"no system D-Bus at {DBUS_SOCKET}", "sudo apt install dbus bluez")
    adapters = sorted(p.name for p in BLUETOOTH_CLASS.glob("hci*"))
    if not adapters:
        return Check(
            "ble",
            bad,
            "no Bluetooth adapter (nothing in /sys/class/bluetooth)",
            "plug in an adapter or enable the built-in one (rfkill unblock bluetooth)",
        )
    member = _in_group("bluetooth")
    if member is False and os.geteuid() != 0:
        return Check(
            "ble",
            "warn",
            f"adapters {', '.join(adapters)}; this user is not in group bluetooth",
            "sudo usermod -aG bluetooth $USER (the systemd unit adds it itself)",
        )
    return Check("ble", "ok", f"adapters {', '.join(adapters)}, D-Bus up")


def check_serial(config: Config, explicit: bool) -> Check:
    try:
        load_driver("serial")
    except DriverLoadError as exc:
        return Check("serial", "fail" if explicit else "warn", exc.reason, exc.fix)
    devices = (config.get("drivers.serial") or {}).get("devices") or {}
    ports = [
        str(d.get("port"))
        for d in devices.values()
        if isinstance(d, dict) and d.get("port") and "://" not in str(d.get("port"))
    ]
    missing = [p for p in ports if not os.path.exists(p)]
    if missing:
        return Check(
            "serial",
            "fail" if explicit else "warn",
            f"configured ports missing: {', '.join(missing)}",
            "plug the device in, or fix drivers.serial.devices.*.port (ls /dev/serial/by-id)",
        )
    denied = [p for p in ports if not os.access(p, os.R_OK | os.W_OK)]
    if denied or (_in_group("dialout") is False and os.geteuid() != 0):
        where = f"no read/write access to {', '.join(denied)}" if denied else "not in dialout"
        return Check(
            "serial",
            "fail" if denied else "warn",
            where,
            "sudo usermod -aG dialout $USER, then log in again (the unit adds it itself)",
        )
    return Check("serial", "ok", f"{len(ports)} configured ports present and writable")


async def check_broker(config: Config) -> Check:
    settings = BrokerSettings.from_config(config)
    problem = await asyncio.to_thread(diagnose_broker, settings)
    if problem is not None:
        return Check("broker", "fail", problem, "see docs/operations.md, Broker")
    link = MqttLink(f"dm-doctor-{os.getpid()}", settings, on_message=lambda _: None)
    try:
        await link.connect(timeout=float(config.get("client.timeout_s")))
    except DatamuxError as exc:
        return Check("broker", "fail", str(exc), "check broker.username, password and ACL")
    finally:
        await link.close()
    tls = "TLS, " if settings.ca_file or settings.cert_file else "plain TCP, "
    login = f"logged in as {settings.username}" if settings.username else "anonymous"
    return Check("broker", "ok", f"{settings.address}: {tls}{login}")


def check_clock() -> Check:
    state = clock_sync()
    synced, source = state.get("clock_synced"), state.get("clock_source")
    if synced:
        return Check("clock", "ok", f"synchronised ({source})")
    fix = "enable NTP: sudo timedatectl set-ntp true (or run chrony); a Pi has no RTC"
    if synced is None:
        return Check("clock", "warn", "cannot tell whether the clock is synchronised", fix)
    # A warning: the agent serves anyway, but time stamps from this box drift.
    return Check("clock", "warn", f"not synchronised ({source}): time stamps drift", fix)


def check_disk(config: Config) -> Check:
    folder = Path(config.get("agent.state_dir") or state_dir())
    space = disk_space(folder)
    if not space:
        return Check("disk", "warn", f"cannot read free space at {folder}")
    free = space["disk_free_mb"]
    need = max(MIN_FREE_MB, float(config.get("agent.spool_max_mb")))
    if free < need:
        return Check(
            "disk",
            "fail",
            f"{free:.0f} MB free at {folder}, less than the {need:.0f} MB the spool may use",
            "free space, or lower agent.spool_max_mb",
        )
    return Check("disk", "ok", f"{free:.0f} MB free at {folder}")


async def run_checks(config: Config) -> list[Check]:
    enabled = _enabled(config)
    explicit = str(config.get("drivers.enabled")).strip().lower() != "auto"
    checks: list[Check] = []
    per_driver: dict[str, Callable[[], Check]] = {
        "lsl": lambda: check_lsl(explicit),
        "ble": lambda: check_ble(explicit),
        "serial": lambda: check_serial(config, explicit),
    }
    for name in enabled:
        if name in per_driver:
            checks.append(per_driver[name]())
    checks.append(await check_broker(config))
    checks.append(check_clock())
    checks.append(check_disk(config))
    return checks


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    doctor = subparsers.add_parser(
        "doctor",
        help="check this box: liblsl, BLE, serial access, broker, clock, disk",
        description="Check what the agent needs on this box and print each problem with "
        "its fix. Exit code 1 when a check fails.",
    )
    broker_flags(doctor)
    doctor.add_argument("--drivers", help='drivers to check (default: drivers.enabled), e.g. "lsl"')
    doctor.add_argument("--json", action="store_true", help="print JSON for scripts")
    doctor.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    flags = dict(getattr(args, "config_flags", None) or {})
    flags.update({**broker_overrides(args), "drivers.enabled": args.drivers})
    try:
        config = load_config(flags={k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        print(Check("config", "fail", str(exc)).line())
        return 2
    checks = asyncio.run(run_checks(config))
    if args.json:
        print(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        print("\n".join(c.line() for c in checks))
    return 1 if any(c.level == "fail" for c in checks) else 0

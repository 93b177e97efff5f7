"""The serial driver: configured devices, plus the ports the OS sees."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from serial.tools import list_ports

from ...errors import NotFound
from ...framing import Framing
from ...model import Node, Stream
from ..base import Driver, DriverStatus
from .options import _URL, CONFIG_PATH, DeviceSpec, parse_options
from .parsers import ParseStats
from .reader import MAX_BATCH_S, _PortReader
from .source import SerialSource

log = logging.getLogger(__name__)


def _port_node_id(info: Any, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", info.name or os.path.basename(info.device))
    base = (base if base and base[0] not in ".-" else f"port{base}")[:58]
    node_id, n = base, 1
    while node_id in taken:
        n += 1
        node_id = f"{base}-{n}"
    return node_id


class SerialDriver(Driver):
    """Serial devices from ``drivers.serial``, plus the ports the OS sees.

    Args:
        devices: configured devices by node id (see :func:`parse_options`).
        list_ports: also list unconfigured ports as nodes without streams.
    """

    name = "serial"

    def __init__(
        self, devices: Mapping[str, DeviceSpec] | None = None, *, list_ports: bool = False
    ) -> None:
        self.devices = dict(devices or {})
        self.list_ports = list_ports
        self._readers = {nid: _PortReader(spec, ParseStats()) for nid, spec in self.devices.items()}

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, recordings: Any = None) -> SerialDriver:
        """From the ``drivers.serial`` section: ``{"devices": {...}, "list_ports": false}``."""
        devices, list_ports_flag = parse_options(options)
        return cls(devices, list_ports=list_ports_flag)

    def status(self) -> DriverStatus:
        # Device files only; URLs (socket://, rfc2217://) are checked when opened.
        missing = sorted(
            spec.port
            for spec in self.devices.values()
            if not _URL.match(spec.port) and not os.path.exists(spec.port)
        )
        if missing:
            fix = "plug the device in (its reader retries), or fix the port in drivers.serial"
            return DriverStatus(self.name, "degraded", f"missing ports: {', '.join(missing)}", fix)
        return DriverStatus(self.name)

    def stats(self, node_id: str) -> ParseStats:
        """The bad-input counters of one configured device (kept across reopens)."""
        return self._reader(node_id).stats

    def _reader(self, node_id: str) -> _PortReader:
        try:
            return self._readers[node_id]
        except KeyError:
            known = ", ".join(self.devices) or "none"
            raise NotFound(f"no serial device {node_id!r}; configured: {known}") from None

    def _port_nodes(self) -> list[Node]:
        """Ports the OS reports that no configured device uses (blocking: sysfs, registry)."""
        try:
            ports = sorted(list_ports.comports(), key=lambda p: p.device)
        except Exception as exc:  # listing is a convenience; never fail a node listing
            log.debug("listing serial ports failed: %s", exc)
            return []
        used = {os.path.realpath(d.port) for d in self.devices.values() if not _URL.match(d.port)}
        taken = set(self.devices)
        nodes = []
        for info in ports:
            if os.path.realpath(info.device) in used:
                continue
            node_id = _port_node_id(info, taken)
            taken.add(node_id)
            described = info.description if info.description not in (None, "n/a") else ""
            hwid = info.hwid if info.hwid not in (None, "n/a") else ""
            about = ", ".join(part for part in (described, hwid) if part) or "no details"
            nodes.append(
                Node(
                    id=node_id,
                    name=described or info.device,
                    description=f"{info.device} ({about}); not configured: add it under "
                    f"{CONFIG_PATH}.devices with its channels and format to stream it",
                    device={
                        "port": info.device,
                        "description": described,
                        "hwid": hwid,
                        "vid": info.vid,
                        "pid": info.pid,
                        "serial_number": info.serial_number,
                        "manufacturer": info.manufacturer,
                        "product": info.product,
                    },
                    kind="serial-port",
                )
            )
        return nodes

    async def list_nodes(self) -> list[Node]:
        nodes = [spec.to_node() for spec in self.devices.values()]
        if self.list_ports:
            nodes.extend(await asyncio.to_thread(self._port_nodes))
        return nodes

    async def list_streams(self, node_id: str) -> list[Stream]:
        if node_id in self.devices:
            return [self.devices[node_id].to_stream()]
        if self.list_ports and node_id in {n.id for n in await asyncio.to_thread(self._port_nodes)}:
            return []  # a port nobody configured: nothing to stream yet
        raise NotFound(f"no serial node {node_id!r}")

    def open_stream(
        self, node_id: str, stream_id: str, attrs: Mapping[str, Any], framing: Framing
    ) -> SerialSource:
        unconfigured = node_id not in self.devices and self.list_ports
        if unconfigured and node_id in {n.id for n in self._port_nodes()}:
            raise NotFound(
                f"serial port {node_id!r} has no streams until it is configured: add it "
                f"under {CONFIG_PATH}.devices with its port, channels and format"
            )
        reader = self._reader(node_id)
        spec = reader.spec
        if stream_id != spec.stream:
            raise NotFound(
                f"serial device {node_id!r} has no stream {stream_id!r}; stream: {spec.stream}"
            )
        return SerialSource(spec.to_stream(), reader, framing.source_period_s(MAX_BATCH_S))

    async def aclose(self) -> None:
        """Stop every reader and close every port."""
        await asyncio.gather(*(reader.halt() for reader in self._readers.values()))

"""``datamux serve`` (the agent) and ``datamux demo`` (an agent plus a remote client)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ..config import Config, load_config
from ..dirs import cache_dir
from ..errors import ConfigError, Unavailable
from .stream_cmds import run_command

__all__ = ["register"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the agent: serve this box's collections and devices over MQTT",
        description="Connect to the MQTT broker and serve RPC requests, tasks and frames "
        "until SIGTERM or Ctrl-C (docs/agent.md).",
    )
    broker_flags(serve)
    serve.add_argument(
        "-r", "--rpc", default="mqtt", choices=["mqtt"], help="transport (only mqtt)"
    )
    serve.add_argument(
        "-c", "--codec", choices=["cbor", "json"], help="codec of the agent's own messages"
    )
    serve.add_argument("--id", dest="agent_id", help="agent id (default: agent.id or host name)")
    serve.add_argument(
        "--embedded",
        choices=["auto", "always", "never"],
        help="run an in-process broker (default: broker.embedded)",
    )
    serve.add_argument("--state-dir", help="where the spool lives (default: agent.state_dir)")
    serve.add_argument("--drivers", help='live drivers, e.g. "sim,lsl" (default: drivers.enabled)')
    serve.set_defaults(handler=lambda args: run_command(_serve(args)))

    demo = subparsers.add_parser(
        "demo",
        help="start an agent with a simulated device and print its data through the RemoteAPI",
        description="Starts `datamux serve` (with an embedded broker when none answers on "
        "the broker address), connects a RemoteAPI client, proxies the simulated demo/eeg "
        "stream and prints its frames, then stops the agent.",
    )
    broker_flags(demo)
    demo.add_argument("--seconds", type=float, default=5.0, help="how long to print (default 5)")
    demo.add_argument("--node", default="demo", help="node id (default: demo)")
    demo.add_argument("--stream", default="eeg", help="stream id (default: eeg)")
    demo.set_defaults(handler=lambda args: run_command(_demo(args)))


def broker_flags(parser: argparse.ArgumentParser) -> None:
    """``-H``/``-p``, and ``--broker HOST[:PORT]`` as ls, tail and replay spell it."""
    parser.add_argument("-H", "--host", help="broker host (default: broker.host)")
    parser.add_argument("-p", "--port", type=int, help="broker port (default: broker.port)")
    parser.add_argument(
        "--broker", metavar="HOST[:PORT]", type=_host_port, help="the same as -H HOST -p PORT"
    )


def _host_port(value: str) -> tuple[str, int | None]:
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "")
    if not host or (port and not port.isdigit()):
        raise argparse.ArgumentTypeError(f"takes HOST or HOST:PORT, not {value!r}")
    return host, int(port) if port else None


def broker_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config flags of the broker options (-H and -p win over --broker)."""
    host, port = args.broker or (None, None)
    return {"broker.host": args.host or host, "broker.port": args.port or port}


def _config(args: argparse.Namespace, **extra: Any) -> Config:
    flags = dict(getattr(args, "config_flags", None) or {})
    flags.update({**broker_overrides(args), **extra})
    return load_config(flags={k: v for k, v in flags.items() if v is not None})


# -- serve -------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    from ..agent.embedded import EmbeddedBroker, broker_reachable, is_loopback
    from ..agent.service import Agent
    from ..mqttio import BrokerSettings

    config = _config(
        args,
        **{
            "agent.codec": args.codec,
            "agent.id": args.agent_id,
            "broker.embedded": args.embedded,
            "agent.state_dir": args.state_dir,
            "drivers.enabled": args.drivers,
        },
    )
    if not logging.getLogger().isEnabledFor(logging.INFO) and not getattr(args, "verbose", 0):
        logging.getLogger().setLevel(config.log_level)  # a service logs at its configured level
    host, port = config.get("broker.host"), config.get("broker.port")
    embedded = config.get("broker.embedded")
    start_broker = embedded == "always" or (
        embedded == "auto"
        and is_loopback(host)
        and not await asyncio.to_thread(broker_reachable, host, port)
    )
    # The agent (config, drivers) is built before anything starts: a config error then
    # stops serve with its own message, not amid an embedded broker's shutdown noise.
    # amqtt speaks MQTT 3.1.1 only: no need to try 5 first.
    agent = Agent(
        config,
        settings=BrokerSettings.from_config(config, protocol="3.1.1") if start_broker else None,
    )
    broker = None
    if start_broker:
        if embedded == "auto":
            log.warning("no MQTT broker on %s:%d: starting the embedded one", host, port)
        try:
            broker = await EmbeddedBroker.start(host, port)
        except BaseException:
            await agent.api.aclose()
            raise
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if broker is not None:
            broker.quiet_shutdown()
        agent.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    try:
        await agent.run()
    finally:
        if broker is not None:
            await broker.aclose()
    return 0


# -- demo --------------------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    from .. import END_OF_STREAM, Frame, RemoteAPI
    from ..agent.embedded import broker_reachable
    from .stream_cmds import FramePrinter

    config = _config(args)
    host, port = config.get("broker.host"), config.get("broker.port")
    state_dir = str(cache_dir() / "demo")  # a throwaway spool; platformdirs' cache folder
    command = [
        sys.executable,
        "-m",
        "streaminghub_datamux",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--id",
        "demo-agent",
        "--drivers",
        "sim",
        "--state-dir",
        state_dir,
    ]
    print(f"$ datamux serve --host {host} --port {port} --id demo-agent --drivers sim")
    # With no broker there now, the agent starts the embedded one, which speaks 3.1.1.
    embedded = not await asyncio.to_thread(broker_reachable, host, port)
    env = {**os.environ, "STREAMINGHUB_LOG_LEVEL": "WARNING"}  # the agent's warnings only
    with _Interrupts(asyncio.get_running_loop(), asyncio.current_task()) as interrupts:
        agent = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            await _wait_for_broker(host, port, agent, broker_reachable)
            if embedded:
                config = _config(args, **{"broker.protocol": "3.1.1"})
            api = RemoteAPI("mqtt", "cbor", agent_id="demo-agent", config=config)
            await _connect_when_announced(api, host, port, agent)
            nodes = await api.list_live_nodes()
            print("live nodes of demo-agent:", ", ".join(n.id for n in nodes))
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream(args.node, args.stream, {}, sink)
            print(f"proxying {args.node}/{args.stream} over MQTT as task {ack.randseq}:")
            printer = FramePrinter(rows=False)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.seconds) as interrupts.printing:
                    while (item := await sink.get()) is not END_OF_STREAM:
                        if isinstance(item, Frame):
                            printer.frame(item)
                        else:
                            printer.other(item)
            interrupts.printing = None
            await api.close()
            print("done: the client closed; stopping the agent")
            return 0
        except asyncio.CancelledError:
            if not interrupts.fired:
                raise
            return 130
        finally:
            _stop_process(agent)


class _Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP end the demo in order: its client, then its agent.

    The agent runs in a session of its own, so that the terminal's Ctrl-C does not stop
    it (and its broker) under the client, which would log the loss. This process must
    then stop it on every signal that would otherwise end only this process. While
    frames print, a signal ends the printing as --seconds does; before, it cancels.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any] | None) -> None:
        self.loop, self.task = loop, task
        self.printing: asyncio.Timeout | None = None
        self.fired = False

    def __enter__(self) -> _Interrupts:
        for signum in self.SIGNALS:
            self.loop.add_signal_handler(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum in self.SIGNALS:
            self.loop.remove_signal_handler(signum)

    def _on_signal(self) -> None:
        self.fired = True
        if self.printing is not None:
            self.printing.reschedule(self.loop.time())
        elif self.task is not None:
            self.task.cancel()


async def _wait_for_broker(
    host: str, port: int, agent: subprocess.Popen[bytes], reachable: Any
) -> None:
    deadline = time.monotonic() + 20
    while not await asyncio.to_thread(reachable, host, port):
        if agent.poll() is not None:
            raise Unavailable(f"the agent exited with code {agent.returncode}")
        if time.monotonic() > deadline:
            raise Unavailable(f"no broker on {host}:{port} after 20 s")
        await asyncio.sleep(0.1)


async def _connect_when_announced(api: Any, host: str, port: int, agent: Any) -> None:
    from ..errors import NotFound

    deadline = time.monotonic() + 20
    while True:
        try:
            await api.connect(host, port)
            return
        except (NotFound, Unavailable):
            if agent.poll() is not None:
                raise Unavailable(f"the agent exited with code {agent.returncode}") from None
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
        raise ConfigError("the demo agent did not stop on SIGTERM; killed") from None

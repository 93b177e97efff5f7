"""``datamux lsl-out``: re-publish a replayed, live or remote stream as an LSL outlet."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from ..lslout import publish_stream
from .stream_cmds import (
    _api,
    _attrs,
    _remote_flags,
    replay_control_flags,
    replay_control_options,
    run_command,
)

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``lsl-out`` subcommand."""
    parser = subparsers.add_parser(
        "lsl-out",
        parents=[_remote_flags(), replay_control_flags()],
        help="re-publish a stream as an LSL outlet on this machine",
        description="Replay a recording (--collection) or proxy a live stream (--node), "
        "here or through --broker, and push its samples into an LSL outlet that "
        "LabRecorder and other LSL tools see. Ctrl-C stops. See docs/lsl-out.md.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--collection", help="replay a recording of this collection")
    source.add_argument("--node", help="proxy a live stream of this node")
    parser.add_argument("stream", help="stream id")
    parser.add_argument(
        "-a",
        "--attr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="select a recording (repeatable)",
    )
    parser.add_argument(
        "--speed", type=float, default=None, help="replay speed (1 real time, 0 fastest)"
    )
    parser.add_argument("--framing", metavar="PRESET", help="frame preset of the task")
    parser.add_argument("--name", help="the outlet's name (default: the stream's name)")
    parser.add_argument("--type", dest="stream_type", help="the outlet's LSL type")
    parser.add_argument("--source-id", help="the outlet's source_id (default: datamux:<id>)")
    parser.add_argument(
        "--wait-consumer",
        type=float,
        default=0.0,
        metavar="S",
        help="hold the stream back until an inlet connects (at most S seconds)",
    )
    parser.set_defaults(handler=lambda args: run_command(_lsl_out(args)))


async def _lsl_out(args: argparse.Namespace) -> int:
    api = await _api(args)
    try:
        options: dict[str, Any] = {}
        if args.speed is not None:
            options["speed"] = args.speed
        if args.framing:
            options["framing"] = args.framing
        if args.collection:
            options.update(replay_control_options(args))
        publication = await publish_stream(
            api,
            args.stream,
            _attrs(args.attr),
            collection_id=args.collection,
            node_id=args.node,
            name=args.name,
            stream_type=args.stream_type,
            source_id=args.source_id,
            wait_consumer_s=args.wait_consumer,
            **options,
        )
        outlet = publication.outlet
        print(f"LSL outlet {outlet.name!r} (source_id {outlet.source_id}) is live", file=sys.stderr)
        try:
            samples = await publication.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await publication.stop()
            raise
        print(f"{samples} samples published", file=sys.stderr)
        return 0
    finally:
        await api.aclose()

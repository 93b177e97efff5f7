"""The ``datamux`` command line (also ``python -m streaminghub_datamux``).

Exit codes: 0 success, 1 a task or request failed, 2 bad usage or config (the systemd
unit's RestartPreventExitStatus: no restart fixes it), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..config import load_config
from ..errors import ConfigError, DatamuxError
from . import doctor_cmd, lslout_cmd, serve_cmd, setup_cmds, simulate_cmd, status_cmd, stream_cmds
from .logs import configure_logging

__all__ = ["build_parser", "main"]


def _global_flags() -> argparse.ArgumentParser:
    """Flags every subcommand accepts, before or after its name."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("config overrides (highest precedence)")
    group.add_argument(
        "--data_dir",
        "--data-dir",
        dest="g_data_dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="folder of recordings",
    )
    group.add_argument(
        "--meta_dir",
        "--meta-dir",
        dest="g_meta_dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="folder of *.collection.json files",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output (-vv for debug)",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parent = _global_flags()
    parser = argparse.ArgumentParser(
        prog="datamux",
        description="Stream sensor data: replay recordings, proxy live devices, simulate.",
        parents=[parent],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    # Each subparser inherits the global flags so they work after the command name too.
    original_add = subparsers.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [])
        kwargs["parents"] = [_global_flags(), *kwargs["parents"]]
        # A command may redefine a global flag; "resolve" edits the copy, not the main parser.
        kwargs.setdefault("conflict_handler", "resolve")
        return original_add(name, **kwargs)

    subparsers.add_parser = add_parser  # type: ignore[method-assign]
    setup_cmds.register(subparsers)
    stream_cmds.register(subparsers)
    simulate_cmd.register(subparsers)
    serve_cmd.register(subparsers)
    status_cmd.register(subparsers)
    doctor_cmd.register(subparsers)
    lslout_cmd.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = getattr(args, "verbose", 0)
    configure_logging(logging.WARNING - 10 * min(verbosity, 2))
    args.config_flags = {
        key: getattr(args, f"g_{key}")
        for key in ("data_dir", "meta_dir")
        if hasattr(args, f"g_{key}")
    }
    try:
        if not verbosity:
            _apply_configured_log_level(args.config_flags)
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:
        print(f"datamux: config error: {exc}", file=sys.stderr)
        return 2
    except DatamuxError as exc:
        print(f"datamux: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `datamux tail ... | head`
        sys.stderr.close()
        return 0


def _apply_configured_log_level(flags: dict[str, Any]) -> None:
    """Use ``log_level`` from the config when one was set there (-v wins over it)."""
    config = load_config(flags=flags)
    if config.sources.get("log_level", "default") != "default":
        logging.getLogger().setLevel(config.log_level)

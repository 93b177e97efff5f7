"""``datamux init`` and ``datamux config``: write the user rc, show the effective config.

The main CLI calls :func:`register` with its subparsers and passes global ``--data_dir``
style flags as ``args.config_flags`` (dotted key -> value).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import SCHEMA, Config, describe, load_config, write_user_config
from ..drivers.registry import check_driver_names
from ..errors import ConfigError
from ..sample import SAMPLE_ID, write_sample

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``init`` and ``config`` subcommands.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.
    """
    init = subparsers.add_parser(
        "init",
        help="write ~/.streaminghubrc and create the data and metadata folders",
        description="Write data_dir and meta_dir to ~/.streaminghubrc (other keys are kept) "
        "and create both folders. With --example, also write the sample collection the "
        "docs use.",
    )
    # Own dests: argparse lets subparser defaults overwrite the main parser's values,
    # and the main CLI has global --data_dir/--meta_dir of its own.
    init.add_argument(
        "--data_dir", "--data-dir", dest="init_data_dir", metavar="DIR", help=_default("data_dir")
    )
    init.add_argument(
        "--meta_dir", "--meta-dir", dest="init_meta_dir", metavar="DIR", help=_default("meta_dir")
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="replace an rc that is not a JSON object (the old one is kept as .bak)",
    )
    init.add_argument(
        "--example",
        action="store_true",
        help="also write the sample collection 'n_back' that the docs' examples use",
    )
    init.set_defaults(handler=run_init)

    config = subparsers.add_parser(
        "config",
        help="print the effective config and where each value came from",
        description="Print every config key, its value and its source (default, a file, "
        "an environment variable or a flag).",
    )
    config.add_argument("key", nargs="?", help="print only this key's value, e.g. data_dir")
    config.add_argument("--json", action="store_true", help="print JSON {key: {value, source}}")
    config.set_defaults(handler=run_config)


def _default(key: str) -> str:
    return f"default: {SCHEMA[key].default}"


def run_init(args: argparse.Namespace) -> int:
    """Handle ``datamux init``; returns the exit code."""
    flags = getattr(args, "config_flags", None) or {}
    # An explicit init flag wins, then a global flag, then the schema default.
    data_dir = args.init_data_dir or flags.get("data_dir") or SCHEMA["data_dir"].default
    meta_dir = args.init_meta_dir or flags.get("meta_dir") or SCHEMA["meta_dir"].default
    try:
        path = write_user_config(data_dir, meta_dir, force=args.force)
        written = json.loads(path.read_text(encoding="utf-8"))
    except ConfigError as exc:
        return _fail(exc)
    print(f"Wrote {path}")
    for key in ("data_dir", "meta_dir"):
        print(f"  {key} = {written[key]}")
    print("Created both folders if missing. Run 'datamux config' to see the effective config.")
    if args.example:
        _write_example(Path(written["data_dir"]), Path(written["meta_dir"]))
    return 0


def _write_example(data_dir: Path, meta_dir: Path) -> None:
    written, kept = write_sample(data_dir, meta_dir)
    print(
        f"Sample collection '{SAMPLE_ID}': wrote {len(written)} files"
        + (f", kept {len(kept)} that existed" if kept else "")
        + f" ({meta_dir / (SAMPLE_ID + '.collection.json')}, {data_dir / SAMPLE_ID}/)."
    )
    print(f"Try: datamux ls {SAMPLE_ID}")


def run_config(args: argparse.Namespace) -> int:
    """Handle ``datamux config``; returns the exit code."""
    try:
        config = load_config(flags=getattr(args, "config_flags", None))
        check_driver_names(str(config.get("drivers.enabled")))
    except ConfigError as exc:
        return _fail(exc)
    if args.key is not None:
        try:
            config.get(args.key)
        except KeyError as exc:  # the message suggests the closest key
            print(f"datamux config: {exc.args[0]}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(_as_json(config, args.key), indent=2))
    elif args.key is not None:
        print(dict((key, value) for key, value, _ in describe(config))[args.key])
    else:
        print(format_rows(describe(config)))
    return 0


def format_rows(rows: list[tuple[str, str, str]], width: int = 48) -> str:
    """Align ``(key, value, source)`` rows as ``key = value  (source)``.

    Dict values longer than ``width`` are cut with "..." so one big section cannot push
    every source off screen; ``config KEY`` and ``config --json`` show them whole.
    Paths and strings are never cut: they are what people copy.
    """
    rows = [(key, _cut(key, value, width), source) for key, value, source in rows]
    key_width = max(len(key) for key, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    return "\n".join(
        f"{key:<{key_width}} = {value:<{value_width}}  ({source})" for key, value, source in rows
    )


def _cut(key: str, value: str, width: int) -> str:
    if key in SCHEMA and SCHEMA[key].kind == "dict" and len(value) > width:
        return value[: width - 3] + "..."
    return value


def _as_json(config: Config, only: str | None) -> dict[str, dict[str, Any]]:
    out = {}
    for key, shown, source in describe(config):
        if only is not None and key != only:
            continue
        value = config.values[key]
        if SCHEMA[key].secret and value is not None:
            value = shown  # masked
        elif isinstance(value, Path):
            value = str(value)
        out[key] = {"value": value, "source": source}
    return out


def _fail(exc: ConfigError) -> int:
    print(f"datamux: config error: {exc}", file=sys.stderr)
    return 2

"""XDF replay memory and first-frame time on a long recording, beside pyxdf.load_xdf.

Writes a LabRecorder-like XDF file (64 ch float32 at 1 kHz, 500-sample chunks, half of
them with every sample stamped, ClockOffsets every 5 s, a string marker stream; the same
chunk writers as bench/datasets.py) chunk by chunk, so even an hour-long file never sits
in this process's memory. Each measurement runs in a fresh process, so its peak RSS
(``ru_maxrss``) is its own:

* **idle**: the interpreter with numpy, pyxdf and datamux imported (the floor);
* **pyxdf** (baseline): ``pyxdf.load_xdf(path, select_streams=[1], **LOAD_OPTIONS)``;
* **replay**: ``API.replay_collection_stream(..., speed=0, framing="throughput")``
  drained to END_OF_STREAM; time to the first frame and to the end;
* floors: the index pass alone, one plain read of the file, and **fit**: one
  ``np.linalg.lstsq`` of as many stamps on the float64 n x 2 design matrix, what any
  dejitter that agrees with pyxdf bit for bit (one LAPACK fit per segment) holds at least.

Both pyxdf and replay hash the timestamps and values they produce (sha256, in order),
so the bench also checks that replay gives load_xdf's result bit for bit. Runs alternate
and the medians are reported; ``--write-doc`` rewrites the "## XDF memory" section of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import code_version, log, write_doc  # bench/common.py
from datasets import (
    BOUNDARY_UUID,
    EEG_LABELS,
    SAMPLES_PER_CHUNK,
    TAG_BOUNDARY,
    TAG_FILE_HEADER,
    TAG_STREAM_HEADER,
    XdfStreamSpec,
    chunk,
    clock_offset,
    numeric_samples,
    string_samples,
    xml_document,
)
from replay import load_average, machine_facts, make_api

DEFAULT_DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
SECTION = "## XDF memory"
AFTER_SECTION = "## Dataset formats"
AIM_RSS_MB = 150.0
AIM_FIRST_FRAME_S = 0.5
RATE_HZ, CHANNELS = 1000.0, 64


def write_long_xdf(path: Path, seconds: int) -> int:
    """Write the file chunk by chunk; returns the EEG sample count."""
    eeg = XdfStreamSpec(1, "EEG", "EEG", CHANNELS, RATE_HZ, "float32", EEG_LABELS, "uV")
    markers = XdfStreamSpec(2, "Markers", "Markers", 1, 0.0, "string", ["marker"])
    rng = np.random.default_rng(12)
    t0, n = 4711.25, int(seconds * RATE_HZ)
    with path.open("wb") as out:
        out.write(b"XDF:")
        out.write(chunk(TAG_FILE_HEADER, xml_document("<info><version>1.0</version></info>")))
        out.write(chunk(TAG_STREAM_HEADER, eeg.header(t0 - 1.0), eeg.xdf_id))
        out.write(chunk(TAG_STREAM_HEADER, markers.header(t0 - 1.0), markers.xdf_id))
        for number, start in enumerate(range(0, n, SAMPLES_PER_CHUNK)):
            stop = min(n, start + SAMPLES_PER_CHUNK)
            stamps = t0 + np.arange(start, stop) / RATE_HZ + rng.normal(0, 1e-4, stop - start)
            values = (rng.standard_normal((stop - start, CHANNELS)) * 10).astype(np.float32)
            out.write(numeric_samples(eeg.xdf_id, stamps, values, number % 2 == 0))
            now = float(stamps[-1])
            if number % 10 == 0:  # every 5 s
                for stream_id in (eeg.xdf_id, markers.xdf_id):
                    out.write(clock_offset(stream_id, now, -0.0342 + rng.normal(0, 2e-5)))
                out.write(string_samples(markers.xdf_id, [now], [f"trial {number}"]))
            if number % 20 == 0:
                out.write(chunk(TAG_BOUNDARY, BOUNDARY_UUID))
    return n


# -- the measured processes ------------------------------------------------------------


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(mode: str, root: Path, samples_in_file: int = 0) -> dict[str, Any]:
    """One measurement in this (fresh) process; JSON-able."""
    import pyxdf

    import streaminghub_datamux as dm
    from streaminghub_datamux.drivers.xdf import LOAD_OPTIONS

    path = root / "data" / "xdfmem" / "session.xdf"
    stamps_hash, values_hash = hashlib.sha256(), hashlib.sha256()
    first: float | None = None
    samples = 0
    start = time.perf_counter()
    if mode == "pyxdf":
        streams, _ = pyxdf.load_xdf(str(path), select_streams=[1], **LOAD_OPTIONS)
        first = time.perf_counter() - start
        stamps_hash.update(np.ascontiguousarray(streams[0]["time_stamps"]).tobytes())
        values_hash.update(np.ascontiguousarray(streams[0]["time_series"]).tobytes())
        samples = len(streams[0]["time_stamps"])
    elif mode == "replay":

        async def drain() -> None:
            nonlocal first, samples
            sink: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
            await make_api(root).replay_collection_stream(
                "xdfmem", "EEG", {"file": "session"}, sink, speed=0, framing="throughput"
            )
            while (item := await sink.get()) is not dm.END_OF_STREAM:
                if not isinstance(item, dm.Frame):
                    raise RuntimeError(f"replay sent {item!r}")
                if first is None:
                    first = time.perf_counter() - start
                samples += len(item)
                stamps_hash.update(item.timestamps.tobytes())
                values_hash.update(item.values.tobytes())

        asyncio.run(drain())
    elif mode == "index":
        # The index pass alone: every chunk header read, the stamps decoded, then
        # pyxdf's clock sync and the dejitter fit over them. Replay cannot start before
        # it, nor hold less (the fit gives pyxdf's exact result).
        from streaminghub_datamux.drivers.xdfstream import index_stream

        index = index_stream(path, 1, LOAD_OPTIONS)
        first = time.perf_counter() - start
        samples = index.samples
    elif mode == "fit":
        # The dejitter fit alone: the stamps, the design matrix and LAPACK's copies of both.
        stamps = np.arange(samples_in_file, dtype=np.float64) / RATE_HZ
        design = np.empty((samples_in_file, 2), order="F")
        design[:, 0] = 1.0
        design[:, 1] = np.arange(samples_in_file, dtype=np.float64)
        np.linalg.lstsq(design, stamps[:, None], rcond=-1)
        first = time.perf_counter() - start
        samples = samples_in_file
    elif mode == "read":
        # One plain read of the file in 1 MiB blocks: what any reader that must see the
        # whole file before its first frame waits at least.
        block = bytearray(1 << 20)
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(block):
                pass
        first = time.perf_counter() - start
    return {
        "seconds": time.perf_counter() - start,
        "first_frame_s": first,
        "peak_mb": _peak_mb(),
        "digest": f"{stamps_hash.hexdigest()}/{values_hash.hexdigest()}",
        "samples": samples,
    }


def measure(mode: str, root: Path, samples: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--root", str(root), "--samples", str(samples)],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------


def _median(results: Sequence[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def _range(results: Sequence[dict[str, Any]], key: str, fmt: str) -> str:
    values = [r[key] for r in results]
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def render(
    results: dict[str, list[dict[str, Any]]], argv: Sequence[str], args: Any, info: dict[str, Any]
) -> str:
    idle, base, replay = results["idle"], results["pyxdf"], results["replay"]
    rss = _median(replay, "peak_mb")
    first = _median(replay, "first_frame_s")
    verdict = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    facts = "; ".join(f"{k}: {v}" for k, v in machine_facts().items())
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        f"`python bench/xdf_memory.py {' '.join(argv)}` ({args.runs} runs; code: {info['code']}).",
        "",
        f"Machine: {facts}; load average at start -> end: {info['loads'][0]} -> "
        f"{info['loads'][1]}.",
        "",
        f"**Aims.** Replay peak RSS <= {AIM_RSS_MB:g} MB: {verdict(rss <= AIM_RSS_MB)} "
        f"({rss:.0f} MB); first frame <= {AIM_FIRST_FRAME_S:g} s: "
        f"{verdict(first <= AIM_FIRST_FRAME_S)} ({first:.2f} s). Replay's timestamps and "
        "values are load_xdf's bit for bit (sha256 of each, every run). Floors, same run: "
        f"replay's index pass alone peaks at {_median(results['index'], 'peak_mb'):.0f} MB "
        f"and takes {_median(results['index'], 'seconds'):.2f} s; the one least-squares fit "
        "over all its stamps that agreeing with pyxdf bit for bit requires peaks at "
        f"{_median(results['fit'], 'peak_mb'):.0f} MB alone; one plain read of the file "
        f"takes {_median(results['read'], 'seconds'):.2f} s.",
        "",
        f"File: {info['minutes']:g} min of 64 ch float32 at 1 kHz ({info['samples']:,} "
        f"samples, {info['file_mb']:.0f} MB), 500-sample chunks (every other one stamping "
        "each sample), ClockOffsets every 5 s, a marker stream. Each row is a fresh process; "
        "peak RSS is its `ru_maxrss`. Medians (range) over the runs.",
        "",
        "| process | peak RSS MB | peak RSS / file size | first frame s | to the end s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows in (
        ("idle: python + numpy + pyxdf + datamux imported (floor)", idle),
        ("baseline: `pyxdf.load_xdf(path, select_streams=[1], **LOAD_OPTIONS)`", base),
        ('replay: `replay_collection_stream(..., speed=0, framing="throughput")`', replay),
        (
            "floor of replay: its index pass alone (`xdfstream.index_stream`: one read of "
            "the file, pyxdf's clock sync, then the dejitter fit on the stamps)",
            results["index"],
        ),
        (
            "floor of the index pass: one `np.linalg.lstsq` of as many stamps on the float64 "
            "n x 2 design matrix (what a dejitter exact to pyxdf's holds at least)",
            results["fit"],
        ),
        ("floor of the first frame: one plain read of the file (1 MiB blocks)", results["read"]),
    ):
        rss_mb = _median(rows, "peak_mb")
        first_s = "-" if rows is idle else f"{_median(rows, 'first_frame_s'):.2f}"
        end_s = "-" if rows is idle else f"{_median(rows, 'seconds'):.2f}"
        lines.append(
            f"| {name} | {rss_mb:.0f} ({_range(rows, 'peak_mb', '.0f')}) | "
            f"{rss_mb / info['file_mb']:.2f} | {first_s} | {end_s} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="file length (default 60)")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 3)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: 1 minute, 1 run")
    parser.add_argument("--write-doc", action="store_true")
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC)
    parser.add_argument(
        "--child",
        choices=["idle", "pyxdf", "replay", "index", "fit", "read"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.root, args.samples)))
        return 0
    args.minutes = args.minutes or (1.0 if args.quick else 60.0)
    args.runs = args.runs or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench-xdfmem-") as tmp:
        root = Path(tmp)
        path = root / "data" / "xdfmem" / "session.xdf"
        path.parent.mkdir(parents=True)
        (root / "meta").mkdir()
        log(f"writing {args.minutes:g} min of 64 ch at 1 kHz")
        samples = write_long_xdf(path, int(args.minutes * 60))
        info = {
            "minutes": args.minutes,
            "samples": samples,
            "file_mb": path.stat().st_size / 1e6,
            "code": code_version(),
        }
        loads = [load_average()]
        modes = ["idle", "pyxdf", "replay", "index", "fit", "read"]
        results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for run in range(args.runs):
            order = modes if run % 2 == 0 else modes[::-1]
            for mode in order:
                log(f"run {run + 1}/{args.runs}: {mode}")
                results[mode].append(measure(mode, root, samples))
        loads.append(load_average())
        info["loads"] = loads
    digests = {r["digest"] for r in results["pyxdf"] + results["replay"]}
    if len(digests) != 1:
        raise SystemExit(f"replay differs from load_xdf: {sorted(digests)}")
    generated = render(results, argv, args, info)
    print(f"{SECTION}\n\n{generated}")
    if args.write_doc:
        write_doc(args.doc, generated, __file__, SECTION, after=AFTER_SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())

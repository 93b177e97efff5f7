"""Steerable replay: window, loop, seek, pause, speed, through both APIs and the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from helpers import drain, frames_of, gaze_collection, run

import streaminghub_datamux as dm
from streaminghub_datamux.errors import InvalidRequest, NotFound

RATE = 100.0


def setup(workspace, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    workspace.add_collection("study", gaze_collection(frequency=RATE))
    timestamps, values = workspace.add_gaze_recording("A", "1", n=n, frequency=RATE)
    return timestamps, values[:, :2]


def statuses(items: list[Any], name: str | None = None) -> list[dm.StreamStatus]:
    return [
        i for i in items if isinstance(i, dm.StreamStatus) and (name is None or i.status == name)
    ]


def segments(items: list[Any]) -> list[list[dm.Frame]]:
    """The frames between jump statuses (seek, loop)."""
    parts: list[list[dm.Frame]] = [[]]
    for item in items:
        if isinstance(item, dm.StreamStatus) and item.status in ("seek", "loop"):
            parts.append([])
        elif isinstance(item, dm.Frame):
            parts[-1].append(item)
    return parts


def joined(frames: list[dm.Frame]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([f.timestamps for f in frames]), np.concatenate(
        [f.values for f in frames]
    )


def assert_gap_free(items: list[Any]) -> None:
    assert [f.seq for f in frames_of(items)] == list(range(len(frames_of(items))))
    assert not statuses(items, "dropped")


async def next_frames(sink: asyncio.Queue[Any], items: list[Any], count: int) -> None:
    seen = 0
    while seen < count:
        item = await sink.get()
        items.append(item)
        assert item is not dm.END_OF_STREAM
        seen += isinstance(item, dm.Frame)


def test_window_and_loop_replay_exact_samples(workspace, serve):
    timestamps, values = setup(workspace, n=1000)
    first = timestamps[0]
    window = (timestamps >= first + 2.0) & (timestamps < first + 3.5)

    async def body() -> list[Any]:
        async with serve(dm.API(workspace.config())) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.replay_collection_stream(
                "study",
                "gaze",
                {"subject": "A"},
                sink,
                speed=0,
                start=2.0,
                end=3.5,
                loop=3,
                framing={"max_samples": 32},
            )
            return await drain(sink)

    items = run(body())
    assert items[-1] is dm.END_OF_STREAM
    assert_gap_free(items)
    loops = statuses(items, "loop")
    assert [s.data["pass"] for s in loops] == [2, 3]
    assert all(s.data["position"] == 2.0 for s in loops)
    parts = segments(items)
    assert len(parts) == 3
    for part in parts:
        ts, got = joined(part)
        np.testing.assert_array_equal(ts, timestamps[window])
        np.testing.assert_array_equal(got, values[window])


def test_seek_pause_resume_and_speed_while_running(workspace, serve):
    timestamps, values = setup(workspace, n=3000)
    first = timestamps[0]

    async def body() -> tuple[list[Any], list[dict[str, Any]], float]:
        async with serve(dm.API(workspace.config())) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.replay_collection_stream(
                "study", "gaze", {"subject": "A"}, sink, speed=1.0, framing={"max_samples": 5}
            )
            items: list[Any] = []
            states = []
            await next_frames(sink, items, 3)
            states.append(await api.control_task(ack.randseq, "seek", position=20.0))
            await next_frames(sink, items, 3)
            states.append(await api.control_task(ack.randseq, "pause"))
            # Whatever was under way arrives, then the "paused" status; then nothing until
            # resumed. (Waiting for the status, not a fixed 0.6 s: a loaded machine can
            # take longer to deliver what was in flight.)
            async with asyncio.timeout(10):
                while not statuses(items, "paused"):
                    items.append(await sink.get())
            paused_at = len(items)
            await asyncio.sleep(0.4)
            assert sink.empty(), "frames arrived while paused"
            states.append(await api.control_task(ack.randseq, "resume"))
            states.append(await api.control_task(ack.randseq, "speed", speed=20.0))
            began = asyncio.get_running_loop().time()
            await next_frames(sink, items, 80)  # 400 samples: 4 s of recording
            took = asyncio.get_running_loop().time() - began
            states.append(await api.control_task(ack.randseq, "state"))
            await api.stop_task(ack.randseq)
            items.extend(await drain(sink))
            assert statuses(items[:paused_at], "paused")
            return items, states, took

    items, states, took = run(body())
    assert_gap_free(items)
    names = [s.status for s in statuses(items)]
    assert names[:4] == ["seek", "paused", "resumed", "speed"]
    before, after = segments(items)
    ts_before, got_before = joined(before)
    ts_after, got_after = joined(after)
    # Before the jump: from the first sample on, without a gap.
    np.testing.assert_array_equal(ts_before, timestamps[: len(ts_before)])
    np.testing.assert_array_equal(got_before, values[: len(ts_before)])
    # After: exactly from the sample at 20 s, through the pause, without a gap.
    at = int(np.searchsorted(timestamps, first + 20.0))
    np.testing.assert_array_equal(ts_after, timestamps[at : at + len(ts_after)])
    np.testing.assert_array_equal(got_after, values[at : at + len(ts_after)])
    assert states[0]["position"] >= 0 and states[1]["paused"] is True
    assert states[2]["paused"] is False and states[3]["speed"] == 20.0
    assert states[4]["position"] > 20.0
    assert statuses(items, "seek")[0].data == {"position": 20.0}
    # 4 s of recording at speed 20 take about 0.2 s, at speed 1 they would take 4 s
    # (generous bound: a loaded machine).
    assert took < 2.5, took


def test_control_errors_are_clear(workspace, serve):
    setup(workspace, n=100)

    async def body() -> None:
        async with serve(dm.API(workspace.config())) as api:
            live: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream("demo", "eeg", {}, live)
            with pytest.raises(InvalidRequest, match="only replays"):
                await api.control_task(ack.randseq, "pause")
            await api.stop_task(ack.randseq)
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.replay_collection_stream(
                "study", "gaze", {"subject": "A"}, sink, speed=0.01
            )
            with pytest.raises(InvalidRequest, match="actions"):
                await api.control_task(ack.randseq, "rewind")
            with pytest.raises(InvalidRequest, match="position"):
                await api.control_task(ack.randseq, "seek")
            with pytest.raises(InvalidRequest, match="speed"):
                await api.control_task(ack.randseq, "speed", speed=-1)
            await api.stop_task(ack.randseq)
            with pytest.raises(NotFound):
                await api.control_task(ack.randseq, "pause")
            with pytest.raises(InvalidRequest, match="end"):
                await api.replay_collection_stream(
                    "study", "gaze", {"subject": "A"}, sink, start=3, end=2
                )

    run(body())


def test_a_window_after_the_end_is_an_error_saying_the_length(workspace):
    setup(workspace, n=100)  # 0.99 s

    async def body() -> list[Any]:
        async with dm.API(workspace.config()) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.replay_collection_stream(
                "study", "gaze", {"subject": "A"}, sink, speed=0, start=5.0
            )
            return await drain(sink)

    items = run(body())
    errors = [i for i in items if isinstance(i, dm.StreamError)]
    assert len(errors) == 1 and errors[0].code == "invalid_request"
    assert "0.990 s long" in errors[0].reason
    assert not frames_of(items)


def test_cli_replay_window_and_loop(workspace):
    timestamps, _ = setup(workspace, n=500)
    env = {**os.environ, "HOME": str(workspace.root)}
    flags = ["-a", "subject=A", "--speed", "0", "--start", "1", "--end", "2", "--loop", "2"]
    dirs = ["--data-dir", str(workspace.data_dir), "--meta-dir", str(workspace.meta_dir)]
    command = [sys.executable, "-m", "streaminghub_datamux", "replay", "study", "gaze"]
    done = subprocess.run(
        [*command, *flags, "--rows", *dirs],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=workspace.root,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line and line[0].isdigit()]
    expected = timestamps[(timestamps >= timestamps[0] + 1) & (timestamps < timestamps[0] + 2)]
    assert len(rows) == 2 * len(expected)
    assert [float(r.split(",")[0]) for r in rows[:3]] == pytest.approx(expected[:3])
    assert "loop" in done.stdout + done.stderr

"""The task pipeline: live framing, device loss and return, failures, stop."""

from __future__ import annotations

import asyncio

import numpy as np
from helpers import drain, frames_of, run

import streaminghub_datamux as dm
from streaminghub_datamux.drivers.base import Source
from streaminghub_datamux.errors import DataError, DeviceLost
from streaminghub_datamux.framing import Framer, Framing
from streaminghub_datamux.tasks import Task


class ScriptedSource(Source):
    """A live source that plays a list of steps: chunks, pauses, or errors to raise."""

    def __init__(self, steps, opened=None, fail_open=0):
        super().__init__(dm.Stream("s", fields={"a": dm.Field("a")}))
        self.steps, self.opened, self.fail_open = steps, opened, fail_open

    async def open(self):
        if self.opened is not None:
            self.opened.append(1)
            if len(self.opened) <= self.fail_open:
                raise DeviceLost("not plugged in yet")

    async def chunks(self):
        for step in self.steps:
            if isinstance(step, float):
                await asyncio.sleep(step)
            elif isinstance(step, Exception):
                raise step
            else:
                yield step


def chunk(start, n):
    ts = np.arange(start, start + n, dtype=np.float64) * 0.001
    return ts, ts.reshape(-1, 1).astype(np.float32)


SMALL_FRAMES = Framing(max_samples=10, max_latency_ms=30)


def start_task(make_source, framing=SMALL_FRAMES, sink=None):
    sink = asyncio.Queue() if sink is None else sink
    task = Task(
        "t1", make_source, sink, stream_id="s", channels=["a"], attrs={"k": "v"}, framing=framing
    )
    task.start()
    return task, sink


def test_live_framer_flushes_by_count_and_by_latency():
    async def body():
        # 25 samples at once, then 3 more, then silence: 10 + 10 by count, then the rest
        # (5 + 3) once the oldest of them is 300 ms old, long before the source ends.
        # 300 ms, not 30: a loaded machine may hold the loop for tens of milliseconds
        # between the two chunks, which flushed the 5 alone (sizes [10, 10, 5, 3]).
        steps = [chunk(0, 25), 0.005, chunk(25, 3), 5.0]
        framing = Framing(max_samples=10, max_latency_ms=300)
        loop = asyncio.get_running_loop()
        task, sink = start_task(lambda: ScriptedSource(steps), framing)
        stamped = []
        async with asyncio.timeout(4.0):  # the end of the source (5 s) must not be needed
            while len(stamped) < 3:
                item = await sink.get()
                stamped.append((loop.time(), item))
        await task.stop()
        assert await drain(sink) == [dm.END_OF_STREAM]
        return stamped

    stamped = run(body())
    sizes = [len(f) for _, f in stamped]
    assert sizes == [10, 10, 8]
    waited = stamped[2][0] - stamped[1][0]
    assert 0.2 <= waited <= 3.0, waited  # held for max latency, not until the end (5 s)
    values = np.concatenate([f.values[:, 0] for _, f in stamped])
    np.testing.assert_allclose(values, np.arange(28) * 0.001, rtol=1e-6)
    assert [f.seq for _, f in stamped] == [0, 1, 2]
    assert stamped[0][1].attrs == {"k": "v"}


def test_framer_drops_oldest_when_full_and_counts():
    framer = Framer(Framing(max_samples=4, max_latency_ms=10), capacity=8)
    for start in range(0, 12, 2):
        framer.push(*chunk(start, 2), now=0.0)
    assert len(framer) == 8 and framer.dropped == 4
    ts, _ = framer.pop(now=0.0)
    np.testing.assert_allclose(ts, np.arange(4, 8) * 0.001)


def test_device_loss_reports_and_reconnects_with_backoff():
    async def body():
        opened = []
        scripts = iter([[chunk(0, 10), DeviceLost("cable pulled")], [chunk(10, 10)]])
        _, sink = start_task(lambda: ScriptedSource(next(scripts, []), opened, fail_open=0))
        return await drain(sink), opened

    items, _ = run(body())
    kinds = [type(i).__name__ if i is not dm.END_OF_STREAM else "END" for i in items]
    assert kinds == ["Frame", "StreamStatus", "StreamStatus", "Frame", "END"]
    assert items[1].status == "disconnected" and "cable pulled" in items[1].reason
    assert items[2].status == "reconnected"
    assert [f.seq for f in frames_of(items)] == [0, 1]


def test_device_absent_at_open_is_retried():
    async def body():
        opened = []
        _, sink = start_task(lambda: ScriptedSource([chunk(0, 10)], opened, fail_open=2))
        return await drain(sink), opened

    items, opened = run(body())
    assert len(opened) == 3
    assert [getattr(i, "status", None) for i in items[:2]] == ["disconnected", "reconnected"]
    assert len(frames_of(items)) == 1


def test_failure_gives_error_item_then_end():
    async def body():
        _, sink = start_task(
            lambda: ScriptedSource([chunk(0, 3), DataError("bad", file="f.csv", line=9)])
        )
        return await drain(sink)

    items = run(body())
    assert isinstance(items[-2], dm.StreamError)
    assert items[-2].code == "data" and "f.csv, line 9" in items[-2].reason
    assert len(frames_of(items)) == 1  # the 3 samples before the failure are delivered


def test_stop_ends_a_silent_live_task_promptly():
    async def body():
        task, sink = start_task(lambda: ScriptedSource([5.0]))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await task.stop()
        items = await drain(sink)
        return items, loop.time() - start

    items, took = run(body())
    # The source would sleep 5 s more; 1 s, not the 0.1 s it takes on an idle machine,
    # so a loaded CI machine does not fail it.
    assert items == [dm.END_OF_STREAM] and took < 1.0, took


def test_end_reaches_a_full_sink_once_there_is_room():
    async def body():
        sink = asyncio.Queue(maxsize=1)
        sink.put_nowait("occupied")
        task, _ = start_task(lambda: ScriptedSource([RuntimeError("boom")]), Framing(), sink)
        await task.wait()
        return [await sink.get() for _ in range(3)]

    first, error, end = run(body())
    assert first == "occupied"
    assert isinstance(error, dm.StreamError) and error.code == "internal" and "boom" in error.reason
    assert end is dm.END_OF_STREAM


def test_stopping_busy_live_tasks_always_ends_them(workspace):
    """Regression: a cancellation racing a frame deadline must not be lost (3.11 wait_for)."""

    async def body():
        api = dm.API(workspace.config())
        sinks = [asyncio.Queue() for _ in range(20)]
        acks = [
            await api.proxy_live_stream("demo", "eeg", {}, sink, framing="low-latency")
            for sink in sinks
        ]
        await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(api.stop_task(ack.randseq) for ack in acks))
        ends = await asyncio.gather(*(drain(sink) for sink in sinks))
        return loop.time() - start, [items[-1] for items in ends]

    took, lasts = run(body(), timeout=20)
    assert all(item is dm.END_OF_STREAM for item in lasts)
    # A lost cancellation never ends (the run's 20 s bound); a loaded machine takes longer
    # than the idle ~0.1 s to stop 20 tasks, hence 5 s.
    assert took < 5.0, took


def test_dropped_samples_are_reported_not_silent():
    async def body():
        steps = [chunk(i * 10, 10) for i in range(100)]  # 1000 samples, at once
        sink = asyncio.Queue(maxsize=1)
        task, _ = start_task(lambda: ScriptedSource(steps), sink=sink)
        await asyncio.sleep(0.3)  # the consumer is away; the device is not
        return await drain(sink), task.samples_dropped

    items, dropped = run(body())
    statuses = [i for i in items if isinstance(i, dm.StreamStatus)]
    received = sum(len(f) for f in frames_of(items))
    assert statuses and all(s.status == "dropped" for s in statuses)
    assert dropped > 0 and received + dropped == 1000
    assert str(dropped) in statuses[-1].reason


def test_drops_inside_a_source_are_reported_too():
    class LossySource(ScriptedSource):
        async def chunks(self):
            yield chunk(0, 10)
            self.dropped += 7  # e.g. a device buffer overflowed
            yield chunk(17, 10)

    async def body():
        task, sink = start_task(lambda: LossySource([]))
        return await drain(sink), task.samples_dropped

    items, dropped = run(body())
    (status,) = [i for i in items if isinstance(i, dm.StreamStatus)]
    assert status.status == "dropped" and status.reason.startswith("7 samples") and dropped == 7


def test_a_frame_due_before_the_next_chunk_counts_as_ready() -> None:
    """``early`` (the source's period, at most half the budget) brings the flush forward."""
    framer = Framer(Framing(max_samples=100, max_latency_ms=20), capacity=1000, early=0.005)
    framer.push(np.arange(3) / 1000.0, np.zeros((3, 1)), now=1.0)  # born at 0.998
    assert framer.deadline() == 1.018
    # Due within a period (5 ms) plus the wake jitter margin (1 ms) of now: ready.
    assert not framer.ready(1.0119) and framer.ready(1.0121)
    capped = Framer(Framing(max_samples=100, max_latency_ms=20), capacity=1000, early=1.0)
    assert capped.early == 0.01  # never more than half the latency budget


def test_jittered_wakes_do_not_decide_the_frame_size() -> None:
    """Low-latency (2 ms, chunks every 1 ms): every frame is 2 chunks, none overruns.

    The deadline falls on the next chunk's wake, so before the jitter margin whether a
    frame left or waited one more period past its budget was a coin flip on the two
    wakes' lateness (2.6-2.8 chunks per frame in bench/transport.py).
    """
    framing = Framing(max_samples=256, max_latency_ms=2.0)
    framer = Framer(framing, capacity=4096, early=0.001)
    lateness = np.random.default_rng(7).uniform(0.0, 0.0004, 2000)  # the loop's timers
    sizes, waits, born = [], [], None
    for k, late in enumerate(lateness):
        now = 10.0 + k * 0.001 + late
        framer.push(np.array([now - late]), np.zeros((1, 4)), now)
        born = now if born is None else born
        if framer.ready(now):
            sizes.append(len(framer.pop(now)[0]))
            waits.append(now - born)
            born = None
    assert set(sizes) == {2}
    assert max(waits) <= framing.max_latency_s


class PeriodicSource(ScriptedSource):
    """Chunks of ``n`` samples every ``period_s``, on an absolute schedule."""

    def __init__(self, period_s: float, chunks: int, n: int) -> None:
        super().__init__([])
        self.period_s, self.count, self.n = period_s, chunks, n
        self.delivered: list[float] = []  # loop time of each chunk
        # The last chunk whose loop step has ended: a callback scheduled with a chunk runs
        # only once the step that took the chunk gives the loop back.
        self.step_over = -1

    async def chunks(self):
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(self.count):
            await asyncio.sleep(max(start + (i + 1) * self.period_s - loop.time(), 0.0))
            self.delivered.append(loop.time())
            loop.call_soon(setattr, self, "step_over", i)
            yield chunk(i * self.n, self.n)
        await asyncio.sleep(0.1)


def test_frames_of_a_regular_source_leave_at_its_chunk_wakes() -> None:
    """Each frame goes out with the chunk that brought its deadline within one period.

    No frame waits for a timer of its own: every frame is put on the sink in the same
    loop step as a chunk arrives (so a regular stream costs one wake per chunk), and
    every frame leaves before its oldest sample is max_latency old.
    """
    framing = Framing(max_samples=1000, max_latency_ms=40)

    source = PeriodicSource(0.01, 20, 10)

    class StampingQueue(asyncio.Queue):
        """Notes, for each item put, the last chunk whose loop step had ended then."""

        def put_nowait(self, item):
            super().put_nowait((source.step_over, item))

    async def body():
        sink = StampingQueue()
        task = Task(
            "t", lambda: source, sink, stream_id="s", channels=["a"], attrs={}, framing=framing
        )
        task.start()
        stamped = []
        while (item := await sink.get())[1] is not dm.END_OF_STREAM:
            stamped.append(item)
        return stamped

    stamped = run(body())
    frames = [f for _, f in stamped]
    assert sum(len(f) for f in frames) == 200
    np.testing.assert_array_equal(
        np.concatenate([f.timestamps for f in frames]), np.arange(200) * 0.001
    )
    for step_over, frame in stamped[:-1]:  # the last one is flushed at the end of the stream
        chunk_no = int(frame.timestamps[-1] * 1000) // 10  # the chunk that closed it
        # Put in the loop step that took that chunk (a timer would fire in a later one).
        assert step_over == chunk_no - 1, (step_over, chunk_no)
    # Frames span 4 chunks: the 4th chunk comes 30 ms after the 1st, and the 5th would
    # come at 40 ms, past the deadline (3 when a wake is 1 ms late; fewer when a loaded
    # machine delays a chunk, but never more than the deadline allows).
    sizes = [len(f) for f in frames[:-1]]
    assert all(n % 10 == 0 and 0 < n <= 40 for n in sizes), sizes
    assert np.median(sizes) >= 30, sizes

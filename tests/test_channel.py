"""The thread-to-loop channel every live reader uses, and the sink's high-water put."""

from __future__ import annotations

import asyncio
import threading

import pytest
from helpers import run

from streaminghub_datamux.channel import Channel, ChannelClosed, put_when_room
from streaminghub_datamux.errors import DeviceLost


def test_items_sent_from_a_thread_arrive_in_order_and_close_ends_the_stream():
    async def body():
        channel: Channel[int] = Channel(1000)

        def produce():
            for i in range(500):
                channel.send(i)
            channel.close()

        thread = threading.Thread(target=produce)
        thread.start()
        received = [item async for item in channel]
        thread.join(5)
        return received

    assert run(body()) == list(range(500))


def test_past_capacity_the_oldest_give_way_and_are_counted_by_size():
    drops: list[int] = []
    channel: Channel[list[int]] = Channel(3, size=len, on_drop=drops.append)
    for n in range(1, 6):
        channel.send([0] * n)
    assert channel.dropped == 1 + 2 and drops == [1, 2]
    assert [len(channel.get_nowait()) for _ in range(3)] == [3, 4, 5]
    with pytest.raises(asyncio.QueueEmpty):
        channel.get_nowait()


def test_items_of_no_size_are_never_dropped():
    channel: Channel[object] = Channel(2, size=lambda item: None if isinstance(item, str) else 1)
    for item in ["status", 1, 2, 3, "end"]:
        channel.send(item)
    assert [channel.get_nowait() for _ in range(4)] == ["status", 2, 3, "end"]
    assert channel.dropped == 1


def test_a_close_with_an_error_raises_it_after_the_items_before_it():
    async def body():
        channel: Channel[int] = Channel(10)
        channel.send(1)
        channel.close(DeviceLost("unplugged"))
        channel.close()  # only the first close counts
        channel.send(2)  # after the close: ignored
        assert await channel.receive() == 1
        with pytest.raises(DeviceLost, match="unplugged"):
            await channel.receive()

    run(body())


def test_receive_waits_for_a_send_without_polling_and_a_plain_close_ends_it():
    async def body():
        channel: Channel[int] = Channel(10)
        waiting = asyncio.create_task(channel.receive())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        threading.Thread(target=channel.send, args=(7,)).start()
        assert await asyncio.wait_for(waiting, 5) == 7
        channel.close()
        with pytest.raises(ChannelClosed):
            await channel.receive()

    run(body())


def test_put_when_room_waits_for_the_consumers_next_get():
    async def body():
        sink: asyncio.Queue[int] = asyncio.Queue()
        for i in range(3):
            sink.put_nowait(i)
        putting = asyncio.create_task(put_when_room(sink, 3, high_water=3))
        await asyncio.sleep(0.01)
        assert not putting.done() and sink.qsize() == 3
        assert sink.get_nowait() == 0  # the get wakes the waiting put
        await asyncio.wait_for(putting, 5)
        return [sink.get_nowait() for _ in range(sink.qsize())]

    assert run(body()) == [1, 2, 3]


def test_put_when_room_on_a_bounded_queue_is_its_own_put():
    async def body():
        sink: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
        sink.put_nowait(0)
        putting = asyncio.create_task(put_when_room(sink, 1, high_water=100))
        await asyncio.sleep(0.01)
        assert not putting.done()
        await sink.get()
        await asyncio.wait_for(putting, 5)
        return sink.get_nowait()

    assert run(body()) == 1


def test_a_cancelled_put_when_room_leaves_the_queue_usable():
    async def body():
        sink: asyncio.Queue[int] = asyncio.Queue()
        sink.put_nowait(0)
        putting = asyncio.create_task(put_when_room(sink, 1, high_water=1))
        await asyncio.sleep(0.01)
        putting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await putting
        assert sink.get_nowait() == 0 and sink.empty()
        assert not sink._putters  # type: ignore[attr-defined]

    run(body())

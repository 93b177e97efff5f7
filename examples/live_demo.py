"""Proxy the simulated demo EEG through the local API for two seconds, then stop.

Run: python examples/live_demo.py
"""

import asyncio

import streaminghub_datamux as dm
from streaminghub_datamux import preciseloop


async def main() -> None:
    api = dm.API()
    for node in await api.list_live_nodes():
        print(node.id, [s.id for s in await api.list_live_streams(node.id)])

    sink = asyncio.Queue()
    ack = await api.proxy_live_stream("demo", "eeg", {}, sink, framing="low-latency")

    async def stop_after(seconds: float) -> None:
        await asyncio.sleep(seconds)
        await api.stop_task(ack.randseq)

    stopper = asyncio.create_task(stop_after(2.0))
    samples = 0
    async for frame in dm.frames(sink):  # ends at END_OF_STREAM, raises on an error item
        samples += len(frame)
        print(f"frame {frame.seq}: {len(frame)} samples, Fp1 mean {frame.values[:, 0].mean():+.2f}")
    await stopper
    print(f"{samples} samples in about 2 s (250 Hz)")


if __name__ == "__main__":
    preciseloop.run(main())  # timers on time: the low-latency frames leave on schedule

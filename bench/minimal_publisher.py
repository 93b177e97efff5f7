"""Baseline for the agent's CPU: the least a Python publisher of the same streams can do.

N streams of ``rate`` Hz x ``channels`` float32 (a sine per channel, one vectorised call
per wake), each waking every ``chunk_ms`` on its own absolute schedule, as the agent's
simulated sources do; a stream publishes a frame at the wake after which its oldest
unsent sample would be ``latency_ms`` old, by the agent's framer's rule (age counted
from the chunk's arrival; the next wake may come up to WAKE_JITTER_S late). Frames are
CBOR maps with RFC 8746 typed arrays (cbor2), published with paho-mqtt at the given QoS.
Nothing else: no tasks, no leases, no status, no asyncio.

Prints one JSON line: CPU seconds of this process (all threads) over the timed window
after a warm-up, its loop turns (one per wake) in it, the window's wall time, frames and
samples published.

    python bench/minimal_publisher.py --port 1883 --seconds 5
"""

from __future__ import annotations

import argparse
import heapq
import json
import resource
import sys
import time
from collections.abc import Sequence

import cbor2
import numpy as np
import paho.mqtt.client as mqtt

from streaminghub_datamux.framing import WAKE_JITTER_S


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def frame(stream: int, seq: int, timestamps: np.ndarray, values: np.ndarray) -> bytes:
    return cbor2.dumps(
        {
            "stream_id": f"s{stream}",
            "seq": seq,
            "t": cbor2.CBORTag(86, timestamps.tobytes()),
            "v": cbor2.CBORTag(40, [list(values.shape), cbor2.CBORTag(85, values.tobytes())]),
        }
    )


def run(args: argparse.Namespace) -> dict[str, float]:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-minimal")
    client.connect("127.0.0.1", args.port)
    client.loop_start()
    try:
        period = args.chunk_ms / 1000
        latency = args.latency_ms / 1000
        # The framer's rule (framing.Framer): a frame leaves at the wake whose next wake,
        # give or take the jitter margin, would come after its deadline.
        lead = min(period, latency / 2) + min(min(period, latency / 2) / 2, WAKE_JITTER_S)
        freqs = 1.0 + np.arange(args.channels)
        start, wall0 = time.monotonic(), time.time()
        # Sample k is stamped k / rate (--epoch: + the wall time at start, as the agent's
        # simulator stamps it, so a subscriber on this host can time each sample).
        shift = wall0 if args.epoch else 0.0
        # (next wake, stream): staggered so wakes spread over the period, as tasks do.
        wakes = [(start + period * i / args.streams, i) for i in range(args.streams)]
        heapq.heapify(wakes)
        sent = [0] * args.streams  # samples generated so far, per stream
        held: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(args.streams)]
        born = [0.0] * args.streams  # when the oldest held sample was taken (monotonic)
        seqs = [0] * args.streams
        timed_from = start + args.warmup
        timed_to = timed_from + args.seconds
        cpu_from = frames = samples = 0.0
        turns = 0  # loop turns (one per wake) in the window
        measuring = False
        while True:
            due, stream = heapq.heappop(wakes)
            if (delay := due - time.monotonic()) > 0:
                time.sleep(delay)
            now = time.monotonic()
            if not measuring and now >= timed_from:
                measuring, cpu_from = True, cpu_seconds()
            if now >= timed_to:
                break
            turns += measuring
            upto = int((now - start) * args.rate) + 1
            if upto > sent[stream]:
                k = np.arange(sent[stream], upto) / args.rate
                values = np.sin(2 * np.pi * freqs * k[:, None]).astype(np.float32)
                if not held[stream]:
                    born[stream] = now - min(k[-1] - k[0], latency)
                held[stream].append((k, values))
                sent[stream] = upto
            pieces = held[stream]
            if pieces and now + lead >= born[stream] + latency:
                timestamps = np.concatenate([p[0] for p in pieces])
                values = np.concatenate([p[1] for p in pieces])
                if args.publish:  # without: the wakes, data and framing alone
                    payload = frame(stream, seqs[stream], timestamps + shift, values)
                    client.publish(f"bench/minimal/{stream}", payload, qos=args.qos)
                seqs[stream] += 1
                held[stream] = []
                if measuring:
                    frames += 1
                    samples += len(timestamps)
            heapq.heappush(wakes, (due + period, stream))
        wall = time.monotonic() - timed_from
        return {
            "cpu_s": cpu_seconds() - cpu_from,
            "turns": turns,
            "wall_s": wall,
            "frames": frames,
            "samples": samples,
        }
    finally:
        client.loop_stop()
        client.disconnect()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="broker port on 127.0.0.1")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rate", type=float, default=256.0)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--chunk-ms", type=float, default=10.0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--epoch", action="store_true", help="stamp samples with wall time (for latency)"
    )
    parser.add_argument(
        "--no-publish",
        dest="publish",
        action="store_false",
        help="skip encoding and publishing: what the wakes, data and framing alone cost",
    )
    args = parser.parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

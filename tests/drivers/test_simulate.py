"""Tests of the unguided simulation driver (drivers/simulate.py, drivers/signals.py)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import numpy as np
import pytest

from streaminghub_datamux.drivers.signals import StreamSynth, parse_channel
from streaminghub_datamux.drivers.simulate import SimDriver, SimSource, parse_node
from streaminghub_datamux.errors import ConfigError, DeviceLost, NotFound
from streaminghub_datamux.framing import Framing

TIMEOUT = 10.0  # generous: every live test finishes in well under a second or two


def run(coro: Any) -> Any:
    """Run a coroutine with a hard deadline so no test can hang."""
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def one_stream(stream: dict[str, Any], node: str = "lab1", sid: str = "s") -> SimDriver:
    return SimDriver({node: {"name": "Lab", "streams": {sid: stream}}})


async def collect(
    source: SimSource, *, seconds: float | None = None, samples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Open ``source`` and gather chunks for ``seconds`` or until ``samples`` arrived."""
    ts: list[np.ndarray] = []
    vs: list[np.ndarray] = []
    async with source:
        start = time.monotonic()
        async for t, v in source.chunks():
            assert t.dtype == np.float64 and t.ndim == 1
            assert v.shape == (len(t), len(source.stream.channels))
            ts.append(t)
            vs.append(v)
            if samples is not None and sum(map(len, ts)) >= samples:
                break
            if seconds is not None and time.monotonic() - start >= seconds:
                break
    return np.concatenate(ts), np.concatenate(vs)


# --- listing -----------------------------------------------------------------------


def test_demo_node_is_listed() -> None:
    driver = SimDriver()
    nodes = run(driver.list_nodes())
    assert [n.id for n in nodes] == ["demo"]
    assert nodes[0].kind == "sim"
    assert nodes[0].device == {"model": "simulated", "manufacturer": "streaminghub"}

    streams = {s.id: s for s in run(driver.list_streams("demo"))}
    assert list(streams) == ["eeg", "imu", "markers"]
    eeg, imu, markers = streams["eeg"], streams["imu"], streams["markers"]
    assert eeg.channels == ["Fp1", "Fp2", "C3", "C4", "P3", "P4", "O1", "O2"]
    assert eeg.frequency == 250 and eeg.dtype == np.float32
    assert imu.channels == ["ax", "ay", "az", "gx", "gy", "gz"] and imu.frequency == 100
    assert markers.channels == ["marker"] and markers.frequency == 0
    assert markers.dtype.kind == "U"
    for stream in streams.values():
        assert stream.node_id == "demo"
        assert stream.attrs == {"mode": "simulate"}
        assert stream.index["t"].dtype == "f64" and stream.index["t"].unit == "s"


CONFIG = {
    "lab1": {
        "name": "Bench ECG",
        "description": "two leads",
        "streams": {
            "ecg": {
                "frequency": 500,
                "dtype": "f32",
                "seed": 7,
                "unit": "mV",
                "channels": {
                    "lead1": {"signal": "sine", "freq_hz": 1.2, "noise": 0.05},
                    "lead2": {"signal": "noise", "amplitude": 0.2, "unit": "uV"},
                },
                "chunk_ms": 10,
                "faults": {"jitter_ms": 5, "drop_rate": 0.01},
            }
        },
    }
}


def test_config_nodes_are_listed_with_demo() -> None:
    driver = SimDriver(CONFIG)
    nodes = {n.id: n for n in run(driver.list_nodes())}
    assert list(nodes) == ["demo", "lab1"]
    assert nodes["lab1"].name == "Bench ECG" and nodes["lab1"].description == "two leads"
    (ecg,) = run(driver.list_streams("lab1"))
    assert ecg.id == "ecg" and ecg.node_id == "lab1" and ecg.frequency == 500
    assert ecg.channels == ["lead1", "lead2"]
    assert ecg.fields["lead1"].unit == "mV"  # stream unit by default
    assert ecg.fields["lead2"].unit == "uV"  # channel unit overrides
    assert ecg.fields["lead1"].dtype == "f32"


def test_config_demo_replaces_builtin_demo() -> None:
    stream = {"frequency": 10, "channels": {"x": {"signal": "noise"}}}
    driver = SimDriver({"demo": {"streams": {"only": stream}}})
    assert [n.id for n in run(driver.list_nodes())] == ["demo"]
    assert [s.id for s in run(driver.list_streams("demo"))] == ["only"]


def _stream(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"frequency": 100, "channels": {"c": {"signal": "sine"}}}
    base.update(overrides)
    return base


P = "simulate.nodes.lab1.streams.ecg"


@pytest.mark.parametrize(
    ("stream", "key"),
    [
        (_stream(frequency=-1), f"{P}.frequency"),
        (_stream(frequency="fast"), f"{P}.frequency"),
        ({"channels": {"c": {"signal": "sine"}}}, f"{P}.frequency"),
        (_stream(channels={}), f"{P}.channels"),
        (_stream(channels={"c": {"signal": "triangle"}}), f"{P}.channels.c.signal"),
        (_stream(channels={"c": {"signal": "sine", "freq": 3}}), f"{P}.channels.c.freq"),
        (_stream(channels={"c": {"signal": "noise", "freq_hz": 3}}), f"{P}.channels.c.freq_hz"),
        (_stream(channels={"c": {"signal": "sine", "noise": -1}}), f"{P}.channels.c.noise"),
        (_stream(channels={"c": {"signal": "square", "duty": 2}}), f"{P}.channels.c.duty"),
        (_stream(channels={"c": {"signal": "marker", "labels": []}}), f"{P}.channels.c.labels"),
        (_stream(dtype="complex64"), f"{P}.dtype"),
        (_stream(dtype="str"), f"{P}.dtype"),
        (_stream(seed=-3), f"{P}.seed"),
        (_stream(chunk_ms=0), f"{P}.chunk_ms"),
        (_stream(faults={"drop_rate": 1.5}), f"{P}.faults.drop_rate"),
        (_stream(faults={"jitter": 5}), f"{P}.faults.jitter"),
        (_stream(colour="red"), f"{P}.colour"),
        (
            {"frequency": 0, "channels": {"m": {"signal": "marker"}, "c": {"signal": "sine"}}},
            f"{P}.channels",
        ),
        ({"frequency": 10, "channels": {"m": {"signal": "marker"}}}, f"{P}.frequency"),
    ],
)
def test_config_errors_name_the_key_path(stream: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        SimDriver({"lab1": {"streams": {"ecg": stream}}})
    assert info.value.key == key
    assert key in str(info.value) and "fix:" in str(info.value)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ([1, 2], "simulate.nodes"),
        ({"bad/id": {"streams": {"s": _stream()}}}, "simulate.nodes.bad/id"),
        ({"lab1": {"streams": {}}}, "simulate.nodes.lab1.streams"),
        ({"lab1": {"streams": {"a b": _stream()}}}, "simulate.nodes.lab1.streams.a b"),
        ({"lab1": {"streams": {"s": _stream()}, "extra": 1}}, "simulate.nodes.lab1.extra"),
        ({"lab1": "not a node"}, "simulate.nodes.lab1"),
    ],
)
def test_node_config_errors(config: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        SimDriver(config)
    assert info.value.key == key


# --- signals (generated directly, no clock) -----------------------------------------


def synth(channel: dict[str, Any], fs: float = 1000.0, dtype: str = "f64", seed: int = 1):
    node = parse_node("n", {"streams": {"s": {"frequency": fs, "dtype": dtype, "seed": seed,
                                             "channels": {"c": channel}}}})  # fmt: skip
    spec = node.streams["s"]
    return StreamSynth(spec.channels, spec.frequency, spec.dtype, spec.seed)


def test_sine_frequency_amplitude_and_offset() -> None:
    x = synth({"signal": "sine", "freq_hz": 7, "amplitude": 2, "offset": 1}).take(4000)[:, 0]
    spectrum = np.abs(np.fft.rfft(x - x.mean()))
    freqs = np.fft.rfftfreq(len(x), 1 / 1000)
    assert freqs[spectrum.argmax()] == pytest.approx(7, abs=0.3)
    assert x.max() == pytest.approx(3, abs=1e-3) and x.min() == pytest.approx(-1, abs=1e-3)
    assert x[0] == pytest.approx(1.0)  # phase 0 starts at the offset


def test_sine_phase_shifts_the_wave() -> None:
    x = synth({"signal": "sine", "freq_hz": 1, "phase": np.pi / 2}).take(10)[:, 0]
    assert x[0] == pytest.approx(1.0)


def test_square_is_two_valued_with_duty() -> None:
    x = synth({"signal": "square", "freq_hz": 5, "amplitude": 2, "duty": 0.25}).take(2000)[:, 0]
    assert set(np.unique(x)) == {-2.0, 2.0}
    assert np.mean(x > 0) == pytest.approx(0.25, abs=0.01)
    assert np.count_nonzero(np.diff(x) > 0) == pytest.approx(10, abs=1)  # 5 Hz over 2 s


def test_sawtooth_ramps_and_wraps() -> None:
    x = synth({"signal": "sawtooth", "freq_hz": 2, "amplitude": 1}).take(2000)[:, 0]
    d = np.diff(x)
    rises, falls = d[d > 0], d[d < 0]
    assert np.allclose(rises, 2 * 1 * 2 / 1000)  # 2A per period, f/fs of a period per sample
    assert len(falls) == pytest.approx(4, abs=1)  # one wrap per period, 2 Hz over 2 s
    assert x.min() >= -1 and x.max() < 1


def test_noise_is_gaussian_around_offset() -> None:
    x = synth({"signal": "noise", "amplitude": 0.5, "offset": 3}).take(20000)[:, 0]
    assert x.mean() == pytest.approx(3, abs=0.02)
    assert x.std() == pytest.approx(0.5, rel=0.05)


def test_random_walk_steps_are_bounded() -> None:
    x = synth({"signal": "random_walk", "step": 0.2, "offset": 5}).take(5000)[:, 0]
    steps = np.diff(x)
    assert np.abs(steps).max() <= 0.2 + 1e-12
    assert np.abs(steps).max() > 0.15  # actually uses the range
    assert abs(x[0] - 5) <= 0.2


def test_markers_are_str_labels_at_rate() -> None:
    node = parse_node("n", {"streams": {"m": {"channels": {"marker": {
        "signal": "marker", "labels": ["a", "bb"], "rate_hz": 20}}}}})  # fmt: skip
    spec = node.streams["m"]
    s = StreamSynth(spec.channels, spec.frequency, spec.dtype, spec.seed)
    times, values = s.upto(50.0)
    assert values.dtype.kind == "U" and values.shape == (len(times), 1)
    assert set(np.unique(values)) == {"a", "bb"}
    assert np.all(np.diff(times) > 0)
    assert len(times) == pytest.approx(1000, rel=0.1)


def test_integer_dtypes_are_rounded_and_clipped() -> None:
    x = synth({"signal": "sine", "freq_hz": 3, "amplitude": 1e6}, dtype="i16").take(1000)
    assert x.dtype == np.int16
    assert x.max() == np.iinfo(np.int16).max and x.min() == np.iinfo(np.int16).min
    y = synth({"signal": "sine", "freq_hz": 3, "amplitude": 3.4}, dtype="u8").take(1000)
    assert y.dtype == np.uint8 and set(np.unique(y)) <= {0, 1, 2, 3}
    z = synth({"signal": "noise", "amplitude": 1e30}, dtype="i64").take(100)
    assert z.dtype == np.int64  # huge values clip without overflow warnings


@pytest.mark.parametrize(
    "channel",
    [
        {"signal": "sine", "freq_hz": 3, "noise": 0.1},
        {"signal": "square", "freq_hz": 3, "noise": 0.1},
        {"signal": "sawtooth", "freq_hz": 3, "noise": 0.1},
        {"signal": "noise"},
        {"signal": "random_walk", "noise": 0.1},
    ],
)
def test_samples_do_not_depend_on_chunking(channel: dict[str, Any]) -> None:
    whole = synth(channel, seed=42).take(3000)
    s = synth(channel, seed=42)
    sizes = np.random.default_rng(0).integers(0, 25, 100)
    parts = [s.take(int(n)) for n in sizes]
    parts.append(s.take(3000 - int(sizes.sum())))
    assert np.array_equal(np.concatenate(parts), whole)
    assert not np.array_equal(synth(channel, seed=43).take(3000), whole)


def test_parse_channel_defaults() -> None:
    spec = parse_channel({"signal": "sine"}, "x")
    assert (spec.freq_hz, spec.amplitude, spec.offset, spec.phase, spec.noise) == (1, 1, 0, 0, 0)


# --- live sources ---------------------------------------------------------------------


def test_eeg_timestamps_follow_the_declared_rate() -> None:
    driver = SimDriver()
    before = time.time()
    t, v = run(collect(driver.open_stream("demo", "eeg", {}, Framing()), seconds=1.0))
    after = time.time()
    assert v.dtype == np.float32 and v.shape[1] == 8
    assert np.all(np.diff(t) > 0)
    assert np.median(np.diff(t)) == pytest.approx(1 / 250, rel=0.01)
    assert t[0] == pytest.approx(before, abs=1.0)  # Unix epoch seconds
    # At least one second of samples, and no more than the time the run took (a loaded
    # machine wakes the source late and gets the samples due meanwhile: not 250 +- 10%).
    assert 0.9 * 250 <= len(t) <= (after - before) * 250 + 1
    assert t[-1] <= after  # nothing from the future


def test_wake_interval_respects_framing_latency() -> None:
    driver = SimDriver()
    low = driver.open_stream("demo", "eeg", {}, Framing(max_latency_ms=5))
    assert low.wake_s == pytest.approx(0.0025)
    default = driver.open_stream("demo", "eeg", {}, Framing(max_latency_ms=500))
    assert default.wake_s == pytest.approx(0.010)
    tiny = one_stream(_stream(chunk_ms=0.1)).open_stream("lab1", "s", {}, Framing())
    assert tiny.wake_s == pytest.approx(0.001)


def test_live_seed_reproducible_across_chunk_sizes() -> None:
    channels = {
        "a": {"signal": "random_walk", "noise": 0.1},
        "b": {"signal": "sine", "freq_hz": 13, "noise": 0.3},
    }
    fast = one_stream(_stream(frequency=1000, seed=5, chunk_ms=2, channels=channels))
    slow = one_stream(_stream(frequency=1000, seed=5, chunk_ms=25, channels=channels))
    other = one_stream(_stream(frequency=1000, seed=6, chunk_ms=2, channels=channels))

    async def both() -> list[tuple[np.ndarray, np.ndarray]]:
        return await asyncio.gather(
            *(
                collect(d.open_stream("lab1", "s", {}, Framing()), samples=150)
                for d in (fast, slow, other)
            )
        )

    (_, a), (_, b), (_, c) = run(both())
    assert np.array_equal(a[:150], b[:150])
    assert not np.array_equal(a[:150], c[:150])


def test_drop_rate_removes_that_fraction() -> None:
    driver = one_stream(_stream(frequency=2000, faults={"drop_rate": 0.3}))
    source = driver.open_stream("lab1", "s", {}, Framing())
    t, _ = run(collect(source, seconds=0.5))
    k = np.rint((t - t[0]) * 2000).astype(int)
    assert np.allclose((t - t[0]) * 2000, k, atol=1e-3)  # kept samples stay on the grid
    kept = len(k) / (k[-1] + 1)
    assert kept == pytest.approx(0.7, abs=0.07)


def test_jitter_keeps_timestamps_on_schedule() -> None:
    driver = one_stream(_stream(frequency=500, faults={"jitter_ms": 8}))
    t, _ = run(collect(driver.open_stream("lab1", "s", {}, Framing()), seconds=0.3))
    assert np.allclose(np.diff(t), 1 / 500, atol=1e-6)


def test_disconnect_then_outage_then_reconnect() -> None:
    # An outage of 1 s: the two opens below must fall inside it even when a loaded
    # machine holds the loop a few hundred milliseconds (0.4 s left too little).
    faults = {"disconnect_every_s": 0.3, "disconnect_for_s": 1.0}
    driver = one_stream(_stream(frequency=200, faults=faults))

    async def scenario() -> None:
        source = driver.open_stream("lab1", "s", {}, Framing())
        got: list[np.ndarray] = []
        await source.open()
        start = time.time()
        with pytest.raises(DeviceLost, match="simulated disconnect"):
            async for t, _ in source.chunks():
                got.append(t)
        t = np.concatenate(got)
        assert t[-1] < start + 0.3 + 0.01 and len(t) == pytest.approx(60, abs=3)
        await source.aclose()

        # Both the old source and a fresh one fail while the device is "away".
        with pytest.raises(DeviceLost):
            await source.open()
        with pytest.raises(DeviceLost):
            await driver.open_stream("lab1", "s", {}, Framing()).open()

        await asyncio.sleep(1.05)
        again = driver.open_stream("lab1", "s", {}, Framing())
        t2, _ = await collect(again, samples=10)
        assert t2[0] > t[-1] + 1.0  # the schedule restarts from wall time

    run(scenario())


def test_marker_stream_delivers_str_arrays() -> None:
    stream = {"channels": {"ev": {"signal": "marker", "labels": ["go", "stop"], "rate_hz": 40}}}
    driver = one_stream(stream)
    (meta,) = run(driver.list_streams("lab1"))
    assert meta.frequency == 0 and meta.fields["ev"].dtype == "str"
    t, v = run(collect(driver.open_stream("lab1", "s", {}, Framing()), samples=5))
    assert v.dtype.kind == "U" and v.shape == (len(t), 1)
    assert set(np.unique(v)) <= {"go", "stop"}
    assert np.all(np.diff(t) > 0)


def test_aclose_is_idempotent_and_stops_the_stream() -> None:
    driver = SimDriver()

    async def scenario() -> None:
        source = driver.open_stream("demo", "imu", {}, Framing())
        await source.open()
        seen = 0

        async def consume() -> None:
            nonlocal seen
            async for t, _ in source.chunks():
                seen += len(t)

        task = asyncio.create_task(consume())
        async with asyncio.timeout(10):  # streaming (not a fixed 0.1 s: a loaded machine)
            while not seen:
                await asyncio.sleep(0.01)
        await source.aclose()
        await source.aclose()
        await asyncio.wait_for(task, 5.0)  # the generator ends by itself (at its next wake)
        assert seen > 0

    run(scenario())


def test_unknown_ids_raise_not_found_listing_what_exists() -> None:
    driver = SimDriver(CONFIG)
    with pytest.raises(NotFound, match="demo, lab1"):
        run(driver.list_streams("nope"))
    with pytest.raises(NotFound, match="eeg, imu, markers"):
        driver.open_stream("demo", "nope", {}, Framing())
    with pytest.raises(NotFound):
        driver.open_stream("nope", "eeg", {}, Framing())


def test_disconnect_reaches_every_source_of_the_stream() -> None:
    faults = {"disconnect_every_s": 0.3, "disconnect_for_s": 0.2}
    driver = one_stream(_stream(frequency=200, faults=faults))

    async def last_timestamp(delay: float) -> float:
        await asyncio.sleep(delay)
        source = driver.open_stream("lab1", "s", {}, Framing())
        last = 0.0
        async with source:
            opened = time.time()
            with pytest.raises(DeviceLost):
                async for t, _ in source.chunks():
                    last = float(t[-1])
        return last - opened

    async def both() -> list[float]:
        return await asyncio.gather(last_timestamp(0.0), last_timestamp(0.15))

    first, second = run(both())
    assert first == pytest.approx(0.3, abs=0.05)
    assert second < 0.25  # lost with the first source, before its own 0.3 s were up


def test_stream_synth_matches_its_channels_bit_for_bit() -> None:
    """The vectorised chunk is the per-channel generators' output, exactly."""
    from streaminghub_datamux.drivers.signals import ChannelGenerator, StreamSynth, cast_values

    specs = {
        "a": parse_channel({"signal": "sine", "freq_hz": 10, "amplitude": 20, "noise": 5}, "a"),
        "b": parse_channel({"signal": "square", "freq_hz": 3, "duty": 0.3, "phase": 1.0}, "b"),
        "c": parse_channel({"signal": "noise", "amplitude": 2, "offset": 1}, "c"),
        "d": parse_channel({"signal": "sawtooth", "freq_hz": 0.7, "noise": 0.1}, "d"),
        "e": parse_channel({"signal": "random_walk", "step": 0.5, "noise": 0.2}, "e"),
        "f": parse_channel({"signal": "sine", "freq_hz": 1.5, "phase": 2.0, "offset": -3}, "f"),
    }
    # All channels of one kind, all noisy: the columns are a run (sliced, not gathered).
    uniform = {
        f"u{i}": parse_channel({"signal": "sine", "freq_hz": 1 + i, "noise": 0.5}, f"u{i}")
        for i in range(8)
    }
    for channels, dtype in itertools.product(
        (specs, uniform), (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int16))
    ):
        synth = StreamSynth(channels, 250.0, dtype, seed=42)
        reference = [ChannelGenerator(s, 250.0, 42, i) for i, s in enumerate(channels.values())]
        # Past the noise drawn ahead (256 samples) in small and in large steps.
        for n in (1, 3, 250, 0, 17, 1000, *[1] * 300, 255):
            expected = cast_values(np.stack([g.take(n) for g in reference], axis=1), dtype)
            got = synth.take(n)
            assert got.dtype == expected.dtype and got.shape == (n, len(channels))
            assert got.tobytes() == expected.tobytes()

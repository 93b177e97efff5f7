"""One contract, three implementations: the local API, and the RemoteAPI over a real
mosquitto in both codecs. Every test here runs against each, so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import drain, frames_of, gaze_collection, run, write_csv
from remote import api_factory

import streaminghub_datamux as dm
from streaminghub_datamux.agent.service import Agent
from streaminghub_datamux.errors import InvalidRequest, NotFound
from streaminghub_datamux.interface import DatamuxAPI
from streaminghub_datamux.protocol import METHODS, TABLE

KINDS = ["local", "remote-cbor", "remote-json"]

INT_NODE = {
    "bench": {
        "name": "Bench ADC",
        "streams": {
            "adc": {
                "frequency": 500,
                "dtype": "i16",
                "channels": {"a0": {"signal": "sine", "amplitude": 1000, "freq_hz": 5}},
            }
        },
    }
}


@pytest.fixture(params=KINDS)
def make_api(request, tmp_path):
    broker = None
    if request.param != "local":
        broker = request.getfixturevalue("mosquitto")
    return api_factory(request.param, broker, tmp_path / "state")


def study(workspace, n=2000):
    workspace.add_collection("study", gaze_collection())
    recorded = workspace.add_gaze_recording("A", "1", n=n)
    workspace.add_gaze_recording("B", "2", n=20)
    return recorded


def test_listing_collections_streams_and_recordings(workspace, make_api):
    study(workspace)

    async def body():
        async with make_api(workspace.config()) as api:
            collections = await api.list_collections()
            streams = await api.list_collection_streams("study")
            recordings = await api.list_collection_recordings("study")
            return collections, streams, recordings

    collections, streams, recordings = run(body())
    (collection,) = collections
    assert collection.id == "study" and collection.name == "Gaze study"
    assert set(collection.streams) == {"gaze", "pupil"}
    assert collection.groups["subject"].values == ("A", "B")
    by_id = {s.id: s for s in streams}
    assert by_id["gaze"].channels == ["x", "y"] and by_id["gaze"].dtype == np.float32
    assert by_id["pupil"].frequency == 100.0 and by_id["pupil"].unit == "mm"
    assert sorted(recordings, key=lambda r: r["subject"]) == [
        {"subject": "A", "session": "1"},
        {"subject": "B", "session": "2"},
    ]


def test_replay_delivers_the_recording_exactly(workspace, make_api):
    timestamps, values = study(workspace, n=5000)

    async def body():
        async with make_api(workspace.config()) as api:
            sink = asyncio.Queue()
            ack = await api.replay_collection_stream(
                "study", "gaze", {"subject": "A"}, sink, speed=0, framing={"max_samples": 300}
            )
            assert ack.status and isinstance(ack.randseq, str)
            return await drain(sink)

    items = run(body())
    assert items[-1] is dm.END_OF_STREAM
    frames = frames_of(items)
    assert len(frames) == len(items) - 1  # nothing but frames, then the end
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert all(len(f) <= 300 for f in frames)
    np.testing.assert_array_equal(np.concatenate([f.timestamps for f in frames]), timestamps)
    got = np.concatenate([f.values for f in frames])
    np.testing.assert_array_equal(got, values[:, :2])
    assert got.dtype == np.float32
    assert frames[0].channels == ["x", "y"] and frames[0].stream_id == "gaze"
    assert frames[0].attrs == {"subject": "A", "session": "1"}


def test_frames_helper_and_upstream_samples(workspace, make_api):
    timestamps, values = study(workspace, n=30)

    async def body():
        async with make_api(workspace.config()) as api:
            sink = asyncio.Queue()
            await api.replay_collection_stream("study", "pupil", {"subject": "A"}, sink, speed=0)
            return [f async for f in dm.frames(sink)]

    frames = run(body())
    samples = [s for f in frames for s in f.samples()]
    assert len(samples) == 30
    assert samples[0]["index"]["t"] == timestamps[0]
    assert samples[0]["value"]["d"] == pytest.approx(values[0, 2])


def test_request_errors_are_typed(workspace, make_api):
    study(workspace)

    async def body():
        async with make_api(workspace.config()) as api:
            sink = asyncio.Queue()
            with pytest.raises(NotFound, match="nope"):
                await api.list_collection_streams("nope")
            with pytest.raises(NotFound):
                await api.replay_collection_stream("study", "nope", {"subject": "A"}, sink)
            with pytest.raises(NotFound):
                await api.replay_collection_stream("study", "gaze", {"subject": "Z"}, sink)
            with pytest.raises(InvalidRequest, match="2 recordings"):
                await api.replay_collection_stream("study", "gaze", {}, sink)
            with pytest.raises(InvalidRequest):
                await api.replay_collection_stream("study", "gaze", "A", sink)
            with pytest.raises(InvalidRequest):
                await api.replay_collection_stream(
                    "study", "gaze", {"subject": "A"}, sink, framing="no-such-preset"
                )
            with pytest.raises(NotFound, match="nowhere"):
                await api.list_live_streams("nowhere")
            with pytest.raises(NotFound):
                await api.proxy_live_stream("demo", "nope", {}, sink)
            with pytest.raises(NotFound):
                await api.stop_task("0123456789abcdef")
            assert sink.empty()  # a refused request starts nothing

    run(body())


def test_stop_ends_the_task_and_a_second_stop_is_a_no_op(workspace, make_api):
    study(workspace, n=5000)

    async def body():
        async with make_api(workspace.config()) as api:
            sink = asyncio.Queue()
            ack = await api.replay_collection_stream(
                "study", "gaze", {"subject": "A"}, sink, speed=1.0
            )
            first = await asyncio.wait_for(sink.get(), 10)
            await api.stop_task(ack.randseq)
            rest = await drain(sink)
            again = await api.stop_task(ack.randseq)
            return first, rest, again

    first, rest, again = run(body())
    assert isinstance(first, dm.Frame)
    assert rest[-1] is dm.END_OF_STREAM
    assert sum(len(f) for f in [first, *frames_of(rest)]) < 5000  # stopped early
    assert again.status


def test_a_broken_file_ends_with_an_error_then_end_of_stream(workspace, make_api):
    workspace.add_collection("study", gaze_collection())
    rows = np.column_stack([np.arange(100) / 100, np.ones((100, 3))])
    path = workspace.data_dir / "study" / "A" / "1_gaze.csv"
    write_csv(path, ["t", "x", "y", "d"], rows)
    with path.open("a") as handle:
        handle.write("1.0,not-a-number,2,3\n")

    async def body():
        async with make_api(workspace.config()) as api:
            sink = asyncio.Queue()
            await api.replay_collection_stream("study", "gaze", {"subject": "A"}, sink, speed=0)
            return await drain(sink)

    items = run(body())
    assert items[-1] is dm.END_OF_STREAM
    error = items[-2]
    assert isinstance(error, dm.StreamError) and error.code == "data"
    assert "1_gaze.csv" in error.reason


def test_live_nodes_streams_and_proxy(workspace, make_api):
    async def body():
        async with make_api(workspace.config(**{"simulate.nodes": INT_NODE})) as api:
            nodes = {n.id: n for n in await api.list_live_nodes()}
            streams = {s.id: s for s in await api.list_live_streams("demo")}
            sink = asyncio.Queue()
            ack = await api.proxy_live_stream(
                "demo", "eeg", {"site": "lab"}, sink, framing="low-latency"
            )
            frames = []
            while len(frames) < 5:
                item = await asyncio.wait_for(sink.get(), 10)
                if isinstance(item, dm.Frame):
                    frames.append(item)
            await api.stop_task(ack.randseq)
            rest = await drain(sink)

            adc_sink = asyncio.Queue()
            ack = await api.proxy_live_stream("bench", "adc", {}, adc_sink)
            adc = await asyncio.wait_for(adc_sink.get(), 10)
            await api.stop_task(ack.randseq)
            await drain(adc_sink)
            return nodes, streams, frames, rest, adc

    nodes, streams, frames, rest, adc = run(body())
    assert {"demo", "bench"} <= set(nodes) and nodes["demo"].name == "Demo device"
    assert {"eeg", "imu", "markers"} <= set(streams)
    assert streams["eeg"].frequency == 250 and len(streams["eeg"].channels) == 8
    assert [f.seq for f in frames] == list(range(5))
    assert all(f.values.dtype == np.float32 and f.values.shape[1] == 8 for f in frames)
    assert frames[0].attrs["site"] == "lab"
    stamps = np.concatenate([f.timestamps for f in frames])
    assert np.all(np.diff(stamps) > 0)
    assert rest[-1] is dm.END_OF_STREAM
    assert isinstance(adc, dm.Frame) and adc.values.dtype == np.int16


def test_marker_streams_carry_strings(workspace, make_api):
    async def body():
        async with make_api(workspace.config()) as api:
            sink = asyncio.Queue()
            ack = await api.proxy_live_stream("demo", "markers", {}, sink)
            frame = None
            while frame is None:
                item = await asyncio.wait_for(sink.get(), 15)
                frame = item if isinstance(item, dm.Frame) else None
            await api.stop_task(ack.randseq)
            await drain(sink)
            return frame

    frame = run(body())
    assert frame.values.dtype.kind == "U" and frame.values.shape == (len(frame), 1)
    assert all(isinstance(v, str) and v for v in frame.values[:, 0].tolist())


# -- one interface, one method table -----------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"
INTERFACE = [
    name
    for name, member in vars(DatamuxAPI).items()
    if inspect.iscoroutinefunction(member) and not name.startswith("_")
]


@pytest.mark.parametrize("implementation", [dm.API, dm.RemoteAPI], ids=["local", "remote"])
def test_api_and_remote_api_take_every_parameter_of_the_interface(implementation):
    """Each parameter of DatamuxAPI, of the same kind, with a default where it has one."""
    assert len(INTERFACE) >= 10
    for name in INTERFACE:
        wanted = inspect.signature(getattr(DatamuxAPI, name)).parameters
        offered = inspect.signature(getattr(implementation, name)).parameters
        assert inspect.iscoroutinefunction(getattr(implementation, name)), name
        for param in wanted.values():
            if param.kind is param.VAR_KEYWORD:
                assert any(p.kind is p.VAR_KEYWORD for p in offered.values()), name
                continue
            assert param.name in offered, f"{implementation.__name__}.{name} lacks {param.name}"
            got = offered[param.name]
            assert got.kind == param.kind, f"{implementation.__name__}.{name}({param.name})"
            if param.default is not param.empty:
                assert got.default is not got.empty, f"{name}({param.name}) needs a default"
        # Anything more that an implementation takes must be optional.
        for extra in set(offered) - set(wanted):
            got = offered[extra]
            assert got.default is not got.empty or got.kind is got.VAR_KEYWORD, (name, extra)


def test_every_declared_method_is_served():
    """The agent serves each method of the table: through the API (which the interface
    then offers remotely too) or with its own handler."""
    for method in TABLE.values():
        if method.served_by == "api":
            assert inspect.iscoroutinefunction(getattr(dm.API, method.name)), method.name
            assert method.name in INTERFACE, f"{method.name} is missing from DatamuxAPI"
        else:
            assert inspect.iscoroutinefunction(getattr(Agent, f"_serve_{method.name}"))
        assert method.result is not None, method.name
    # The request parser reads the same table (plus paging's parameters).
    assert set(METHODS) == set(TABLE)
    for name, schema in METHODS.items():
        assert set(TABLE[name].params) <= set(schema)


def test_docs_method_table_matches_the_declarations():
    """docs/protocol.md's table lists each declared method with its parameters in order:
    required ones, then "optional" and the rest."""
    text = (DOCS / "protocol.md").read_text()
    table = text[text.index("| method | params | result |") :].split("\n\n")[0]
    documented = {}
    for name, params in re.findall(r"^\| `(\w+)` \| ([^|]*) \|", table, flags=re.M):
        required, _, optional = params.partition("optional")
        documented[name] = (re.findall(r"`(\w+)`", required), re.findall(r"`(\w+)`", optional))
    assert set(documented) == set(TABLE)
    for name, method in TABLE.items():
        assert documented[name][0] == method.required(), name
        assert sorted(documented[name][1]) == sorted(method.optional()), name


def test_docs_error_table_lists_every_error_code():
    """A client written from docs/protocol.md knows every code an agent can send (and the
    table names no code the client would not rebuild as its own exception)."""
    text = (DOCS / "protocol.md").read_text()
    table = text[text.index("| code | meaning |") :].split("\n\n")[0]
    documented = set()
    for first_column in re.findall(r"^\| ([^|]*) \|", table, flags=re.M)[1:]:
        documented |= set(re.findall(r"`(\w+)`", first_column))
    codes = {cls.code for cls in vars(dm.errors).values() if _is_error_class(cls)}
    assert documented == codes - {"timeout"}  # the client's own: no answer in time


def _is_error_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, dm.errors.DatamuxError)


def test_docs_health_fields_list_every_counter():
    """Every counter the agent keeps is named in docs/protocol.md's health message."""
    from dataclasses import fields

    from streaminghub_datamux.agent.counters import Counters

    text = (DOCS / "protocol.md").read_text()
    health = text[text.index("publishes, retained, QoS 0, on `health`") :].split("\n\n")[0]
    for counter in fields(Counters):
        assert f"`{counter.name}`" in health, counter.name


def test_a_remote_call_is_built_from_the_declaration():
    """Unknown and missing parameters are refused in the agent's words; None is left out."""
    replay = TABLE["replay_collection_stream"]
    built = replay.build(
        {"collection_id": "study", "stream_id": "gaze", "task_id": "t1", "speed": None}
    )
    assert built == {"collection_id": "study", "stream_id": "gaze", "task_id": "t1"}
    with pytest.raises(
        InvalidRequest, match=r"replay_collection_stream: unknown parameters 'sped'"
    ):
        replay.build({"collection_id": "study", "stream_id": "gaze", "task_id": "t1", "sped": 1})
    with pytest.raises(InvalidRequest, match="missing parameter 'task_id'"):
        replay.build({"collection_id": "study", "stream_id": "gaze"})
    assert replay.required() == ["collection_id", "stream_id", "task_id"]


def test_every_declared_method_is_offered_by_both_apis_as_declared():
    """One declaration plus the API's implementation is a whole method: each plain method
    of the table has, on the API and on the RemoteAPI, exactly its declared signature
    (the RemoteAPI is given it from the table); each other method of the interface is a
    coroutine method of both; the rest are the agent's own."""
    plain = [m for m in TABLE.values() if m.signature is not None]
    assert len(plain) >= 5
    for method in TABLE.values():
        if method.signature is not None:
            for implementation in (dm.API, dm.RemoteAPI):
                offered = getattr(implementation, method.name)
                assert offered is not vars(DatamuxAPI)[method.name], "only declared"
                assert inspect.iscoroutinefunction(offered), (implementation, method.name)
                assert inspect.signature(offered) == method.signature, (
                    implementation.__name__,
                    method.name,
                )
            assert method.served_by == "api" and method.fleet != bool(method.params)
        elif method.name in INTERFACE:
            assert inspect.iscoroutinefunction(getattr(dm.API, method.name))
            assert method.name in vars(dm.RemoteAPI), f"RemoteAPI must write {method.name}"
        else:
            assert method.served_by == "agent", method.name


def test_a_declaration_takes_its_parameters_from_the_signature():
    """rpc_method reads a plain method's parameters, their order and which are required
    from the signature, and refuses checks that name other parameters."""
    from streaminghub_datamux import wire
    from streaminghub_datamux.methods import declared_on, from_the_table, rpc_method

    class Toy(DatamuxAPI):
        @rpc_method(wire.STREAMS, checks={"node_id": wire.ID, "kind": wire.ID})
        async def list_channels(self, node_id: str, kind: str = "eeg") -> list[dm.Stream]:
            """The channels of one node."""
            from_the_table()

    (method,) = declared_on(Toy)
    assert method.name == "list_channels" and method.result is wire.STREAMS
    assert list(method.params) == ["node_id", "kind"]
    assert method.required() == ["node_id"] and method.optional() == ["kind"]
    assert method.signature == inspect.signature(Toy.list_channels)
    with pytest.raises(TypeError, match=r"list_channels: checks for \['nod_id'\]"):

        @rpc_method(wire.STREAMS, checks={"nod_id": wire.ID})
        async def list_channels(self, node_id: str) -> list[dm.Stream]:
            from_the_table()

    with pytest.raises(TypeError, match="routed by its first parameter"):

        @rpc_method(wire.STREAMS)
        async def list_everything(self) -> list[dm.Stream]:
            from_the_table()

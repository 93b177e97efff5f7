"""Listings larger than one MQTT message: paged replies between agent and RemoteAPI."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers import drain, frames_of, gaze_collection, run
from remote import remote_api, running_agent

import streaminghub_datamux as dm
from streaminghub_datamux.codec import encode
from streaminghub_datamux.errors import InvalidRequest
from streaminghub_datamux.paging import Pager

RECORDINGS = 5000


def test_remote_listing_of_5000_recordings_arrives_whole_in_pages(workspace, mosquitto, tmp_path):
    workspace.add_collection("big", gaze_collection())
    folder = workspace.data_dir / "big"
    for i in range(RECORDINGS - 1):  # listing reads names only: empty files will do
        (folder / f"S{i:05d}").mkdir(parents=True)
        (folder / f"S{i:05d}" / "1_gaze.csv").touch()
    _, values = workspace.add_gaze_recording("S99999", "1", n=50, collection_id="big")
    config = workspace.config()

    async def body():
        async with dm.API(config) as local:
            expected = await local.list_collection_streams("big")
            recordings = await local.list_collection_recordings("big")
            async with (
                running_agent(config, mosquitto, tmp_path / "state", api=local) as agent,
                remote_api(config, mosquitto, timeout=30.0) as api,
            ):
                wire = [s.to_dict() for s in expected]
                budget = agent.pager.budget(agent.link.max_packet_size)
                assert len(encode(wire, "cbor")) > 10 * budget  # many messages' worth
                streams = await api.list_collection_streams("big")
                assert len(streams) == 2 * RECORDINGS
                assert [(s.id, s.attrs) for s in streams] == [(s.id, s.attrs) for s in expected]
                assert await api.list_collection_recordings("big") == recordings
                # The last listed recording replays through the same attrs.
                last = next(s for s in reversed(streams) if s.id == "gaze")
                sink: asyncio.Queue = asyncio.Queue()
                ack = await api.replay_collection_stream("big", "gaze", last.attrs, sink, speed=0)
                frames = frames_of(await drain(sink))
                await api.stop_task(ack.randseq)
                got = np.concatenate([f.values for f in frames])
                np.testing.assert_array_equal(got, values[:, :2])
                # A client that does not ask for pages gets a clear error, not a packet
                # over the broker's limit.
                with pytest.raises(InvalidRequest, match=r"ask for it in pages: .*page=0"):
                    await api._call("a1", "list_collection_streams", {"collection_id": "big"})

    run(body(), timeout=120)


def test_pages_are_kept_per_client_and_expire():
    pager = Pager(page_bytes=2048, keep_s=0.0)
    items = [{"n": i, "pad": "x" * 100} for i in range(100)]
    first = pager.reply("c1", {"page": 0}, items, "cbor", pager.budget(None))
    assert first["pages"] > 1 and first["items"][0]["n"] == 0
    with pytest.raises(InvalidRequest, match="start again with page=0"):
        pager.reply("c1", {"page": 1, "page_token": first["token"]}, items, "cbor", 2048)
    pager.keep_s = 60.0
    first = pager.reply("c1", {"page": 0}, items, "cbor", 2048)
    with pytest.raises(InvalidRequest, match="no listing"):
        pager.reply("c2", {"page": 1, "page_token": first["token"]}, items, "cbor", 2048)
    pages = [first["items"]] + [
        pager.reply("c1", {"page": k, "page_token": first["token"]}, [], "cbor", 2048)["items"]
        for k in range(1, first["pages"])
    ]
    assert [i for page in pages for i in page] == items
    assert all(len(encode(page, "cbor")) <= 2048 for page in pages)
    with pytest.raises(InvalidRequest, match="page 99 of a listing"):
        pager.reply("c1", {"page": 99, "page_token": first["token"]}, items, "cbor", 2048)
    small = [1, 2, 3]
    assert pager.reply("c1", {}, small, "cbor", 2048) == small  # unpaged, as before


def test_an_agent_from_before_paging_is_asked_without_pages():
    from streaminghub_datamux import protocol
    from streaminghub_datamux.paging import fetch_all_pages

    schema = {"collection_id": protocol.METHODS["list_collection_streams"]["collection_id"]}
    sent = []

    async def old_agent(agent, method, params):  # the old agent's schema check, verbatim
        sent.append(dict(params))
        unknown = sorted(k for k in params if k not in schema)
        if unknown:
            raise InvalidRequest(f"{method}: unknown parameters {unknown}; known: ['x']")
        return [{"id": "gaze"}]

    got = run(fetch_all_pages(old_agent, "a1", "list_collection_streams", {"collection_id": "c"}))
    assert got == [{"id": "gaze"}]
    assert sent == [{"collection_id": "c", "page": 0}, {"collection_id": "c"}]

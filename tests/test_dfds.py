"""Loading DFDS collection metadata: upstream files, @ref references, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import gaze_collection, run

import streaminghub_datamux as dm
from streaminghub_datamux.dfds import load_collection, scan_collections
from streaminghub_datamux.errors import MetadataError

# An upstream collection file, as published (n_back, trimmed to one group).
UPSTREAM_N_BACK = {
    "$schema": "https://raw.githubusercontent.com/nirdslab/streaminghub/master/dfds/collection.jsonschema",
    "name": "n_back",
    "description": "Eye movements of participants during a n-back task",
    "keywords": ["n-back"],
    "authors": [
        {"name": "A. T. D.", "affiliation": "Clemson University", "email": "x@example.edu"}
    ],
    "streams": {
        "gaze": {
            "name": "Gaze",
            "description": "gaze point",
            "unit": "",
            "frequency": 1000,
            "fields": {
                "x": {"name": "gaze x", "description": "Normalized X", "dtype": "f32"},
                "y": {"name": "gaze y", "description": "Normalized Y", "dtype": "f32"},
            },
            "index": {
                "t": {"name": "timestamp", "description": "Recording Timestamp", "dtype": "f32"}
            },
        },
    },
    "groups": {"subject": {"description": "The ID of each subject", "values": ["1", "2"]}},
    "pattern": "h5://S{subject}",
}


def test_upstream_collection_loads_unchanged(tmp_path):
    path = tmp_path / "n_back.collection.json"
    path.write_text(json.dumps(UPSTREAM_N_BACK))
    collection = load_collection(path)
    assert collection.id == "n_back" and collection.name == "n_back"
    assert collection.keywords == ("n-back",)
    gaze = collection.streams["gaze"]
    assert gaze.frequency == 1000 and gaze.channels == ["x", "y"]
    assert gaze.dtype == np.float32 and list(gaze.index) == ["t"]
    assert gaze.collection_id == "n_back"
    assert collection.groups["subject"].values == ("1", "2")
    assert collection.pattern == "h5://S{subject}"


def test_refs_to_local_node_files_are_resolved(tmp_path):
    (tmp_path / "nodes").mkdir()
    node = {
        "device": {"model": "E4"},
        "outputs": {
            "bvp": {
                "name": "blood volume pulse",
                "unit": "lm",
                "frequency": 64,
                "fields": {"bvp": {"name": "bvp", "dtype": "f32"}},
                "index": {"t": {"name": "timestamp", "dtype": "f64"}},
            }
        },
    }
    (tmp_path / "nodes" / "e4.node.json").write_text(json.dumps(node))
    meta = {
        "name": "run",
        "streams": {"bvp": {"@ref": "nodes/e4.node.json#/outputs/bvp"}},
        "pattern": "csv://{subject}",
    }
    path = tmp_path / "run.collection.json"
    path.write_text(json.dumps(meta))
    stream = load_collection(path).streams["bvp"]
    assert stream.frequency == 64 and stream.unit == "lm" and stream.channels == ["bvp"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: m["streams"]["gaze"].update(frequency=-1), "/streams/gaze/frequency"),
        (
            lambda m: m["streams"]["gaze"]["fields"]["x"].update(dtype="complex"),
            "/streams/gaze/fields/x/dtype",
        ),
        (lambda m: m["streams"]["gaze"].update(fields={}), "/streams/gaze/fields"),
        (lambda m: m.update(streams=[]), "/streams"),
        (lambda m: m.update(pattern="{subject}.csv"), "/pattern"),
        (lambda m: m["streams"].update(gaze={"@ref": "https://example.com/x.json#/a"}), "is a URL"),
        (lambda m: m["streams"].update(gaze={"@ref": "missing.json#/a"}), "no file"),
        (lambda m: m["streams"].update(gaze={"@ref": "#/nowhere"}), "points to nothing"),
        (lambda m: m["streams"].update(gaze={"@ref": "#/streams/gaze"}), "deeper than"),
        (lambda m: m["streams"].update(gaze={"@ref": "../elsewhere.json#/a"}), "points outside"),
    ],
)
def test_bad_metadata_names_file_and_json_path(tmp_path, mutate, expected):
    meta = gaze_collection()
    mutate(meta)
    path = tmp_path / "bad.collection.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(MetadataError) as caught:
        load_collection(path)
    assert str(path) in str(caught.value) or "bad.collection.json" in str(caught.value)
    assert expected in str(caught.value)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.collection.json"
    path.write_text('{\n  "name": "x",\n  "streams": {,}\n}')
    with pytest.raises(MetadataError, match=r"line 3, column"):
        load_collection(path)


def test_one_broken_file_does_not_hide_the_others(workspace):
    workspace.add_collection("good", gaze_collection())
    (workspace.meta_dir / "bad.collection.json").write_text("{nope")
    collections, problems = scan_collections(workspace.meta_dir)
    assert list(collections) == ["good"] and list(problems) == ["bad"]

    async def body():
        api = dm.API(workspace.config())
        listed = [c.id for c in await api.list_collections()]
        with pytest.raises(MetadataError, match=r"bad\.collection\.json"):
            await api.list_collection_streams("bad")
        return listed

    assert run(body()) == ["good"]


def test_model_round_trips_through_dicts(tmp_path):
    path = tmp_path / "n_back.collection.json"
    path.write_text(json.dumps(UPSTREAM_N_BACK))
    stream = load_collection(path).streams["gaze"]
    again = dm.Stream.from_dict(stream.id, json.loads(json.dumps(stream.to_dict())))
    assert again == stream


def test_a_file_name_that_is_no_plain_id_is_reported_not_listed(workspace):
    workspace.add_collection("my data", gaze_collection())
    workspace.add_collection("good", gaze_collection())

    async def body():
        api = dm.API(workspace.config())
        listed = [c.id for c in await api.list_collections()]
        _, problems = api.catalog.scan()
        with pytest.raises(dm.errors.NotFound) as caught:
            await api.list_collection_streams("my data")
        return listed, problems, str(caught.value)

    listed, problems, message = run(body())
    assert listed == ["good"] and "rename the file" in str(problems["my data"])
    assert "collections: ['good']" in message

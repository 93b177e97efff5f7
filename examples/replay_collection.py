"""Write a small DFDS collection, then replay it through the local API.

Run: python examples/replay_collection.py [WORKDIR]
(without WORKDIR it works in a temporary folder that is removed at the end).
"""

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import streaminghub_datamux as dm
from streaminghub_datamux.config import load_config


def write_collection(root: Path) -> None:
    """A collection 'mycollection' with one 'gaze' stream and one recording."""
    meta = {
        "name": "My collection",
        "streams": {
            "gaze": {
                "frequency": 60,
                "fields": {"x": {"dtype": "f32"}, "y": {"dtype": "f32"}},
                "index": {"t": {"dtype": "f64", "unit": "s"}},
            }
        },
        "groups": {"subject": {"values": ["A"]}},
        "pattern": "csv://{subject}/gaze",
    }
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "mycollection.collection.json").write_text(json.dumps(meta, indent=2))
    recording = root / "data" / "mycollection" / "A" / "gaze.csv"
    recording.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(120) / 60
    rows = np.column_stack([t, np.sin(t), np.cos(t)])
    np.savetxt(recording, rows, delimiter=",", header="t,x,y", comments="")


async def main(root: Path) -> None:
    write_collection(root)
    config = load_config(flags={"data_dir": str(root / "data"), "meta_dir": str(root / "meta")})
    api = dm.API(config)
    for c in await api.list_collections():
        print(c.id, [s.id for s in await api.list_collection_streams(c.id)])
    print("recordings:", await api.list_collection_recordings("mycollection"))

    sink = asyncio.Queue()
    ack = await api.replay_collection_stream(
        "mycollection", "gaze", {"subject": "A"}, sink, speed=4
    )
    while (item := await sink.get()) != dm.END_OF_STREAM:
        print(item.seq, item.timestamps[0], item.values.shape)
    await api.stop_task(ack.randseq)  # already ended: a no-op
    print("task", ack.randseq, "finished")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(Path(sys.argv[1])))  # kept, to look at
    else:
        with tempfile.TemporaryDirectory(prefix="datamux-example-") as workdir:
            asyncio.run(main(Path(workdir)))  # removed at the end

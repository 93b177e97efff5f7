"""The agent's store-and-forward spool, on real files (agent/spool.py, docs/spool.md)."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streaminghub_datamux.agent import spool as spool_module
from streaminghub_datamux.agent.spool import Spool, SpooledMessage
from streaminghub_datamux.errors import ConfigError

# Every message of these tests is one 114-byte record: 8 header + 3 + "t/x" + 100 payload.
RECORD = 114
# With the 8-byte segment header, five records fit in a 600-byte segment, the sixth rolls.
SEGMENT = 600
PER_SEGMENT = 5
BIG = 1 << 20


def message(i: int) -> SpooledMessage:
    return SpooledMessage("t/x", i.to_bytes(4, "little") * 25, 1)


def number(m: SpooledMessage) -> int:
    return int.from_bytes(m.payload[:4], "little")


def fill(spool: Spool, numbers: range | list[int]) -> None:
    for i in numbers:
        m = message(i)
        spool.append(m.topic, m.payload, m.qos)


def numbers(spool: Spool) -> list[int]:
    held = spool.peek(10_000)
    assert len(held) == len(spool)
    return [number(m) for m in held]


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.spool"))


def on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in segments(folder))


def damage(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(folder: Path) -> Iterator[Spool]:
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as s:
        yield s


def test_order_is_kept_across_segments(folder: Path) -> None:
    sizes = [0, 1, 99, 700, 5, 3000, 17]
    with Spool(folder, max_bytes=BIG, segment_bytes=1024) as spool:
        for i in range(60):
            spool.append(f"dm/é/{i}", bytes([i]) * sizes[i % len(sizes)], i % 3)
        held = spool.peek(100)
        assert len(spool) == 60
        assert spool.depth_bytes == on_disk(folder)
    assert len(segments(folder)) > 10
    assert [m.topic for m in held] == [f"dm/é/{i}" for i in range(60)]
    assert [m.payload for m in held] == [bytes([i]) * sizes[i % len(sizes)] for i in range(60)]
    assert [m.qos for m in held] == [i % 3 for i in range(60)]


def test_peek_does_not_remove_and_commit_does(spool: Spool, folder: Path) -> None:
    fill(spool, range(12))
    assert [number(m) for m in spool.peek(3)] == [0, 1, 2]
    assert [number(m) for m in spool.peek(3)] == [0, 1, 2]
    assert spool.peek(0) == []
    spool.commit(0)
    assert len(spool) == 12
    spool.commit(3)
    assert len(spool) == 9
    assert [number(m) for m in spool.peek(2)] == [3, 4]
    before = spool.depth_bytes
    spool.commit(2)  # the first segment is done: its file goes
    assert spool.depth_bytes == before - (8 + PER_SEGMENT * RECORD) == on_disk(folder)
    assert numbers(spool) == list(range(5, 12))
    with pytest.raises(ValueError, match="holds 7"):
        spool.commit(8)
    with pytest.raises(ValueError):
        spool.commit(-1)
    spool.commit(7)
    assert len(spool) == 0 and spool.peek(5) == []
    assert spool.depth_bytes == 0 and segments(folder) == []
    fill(spool, [99])
    assert numbers(spool) == [99]
    assert spool.depth_bytes == on_disk(folder) == 8 + RECORD


def test_reopen_keeps_uncommitted_messages_and_the_cursor(folder: Path) -> None:
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        fill(spool, range(12))
        spool.peek(7)
        spool.commit(7)
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert len(spool) == 5
        assert numbers(spool) == list(range(7, 12))
        assert spool.depth_bytes == on_disk(folder)
        fill(spool, range(12, 20))
        spool.commit(1)
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert numbers(spool) == list(range(8, 20))
        assert spool.dropped == 0


def test_reopen_when_everything_was_sent(folder: Path) -> None:
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        fill(spool, range(8))
        spool.commit(8)
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert len(spool) == 0 and spool.depth_bytes == 0
        fill(spool, [8])
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert numbers(spool) == [8]


@pytest.mark.parametrize(
    "tear",
    [
        pytest.param(lambda raw: raw[:-3], id="cut-3-bytes"),
        pytest.param(lambda raw: raw[: -(RECORD - 4)], id="half-a-header-left"),
        pytest.param(lambda raw: raw + bytes(300), id="zero-filled-after-power-cut"),
    ],
)
def test_a_torn_last_record_is_cut_off_on_open(
    folder: Path, tear: object, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        fill(spool, range(13))
    last = segments(folder)[-1]
    last.write_bytes(tear(last.read_bytes()))  # type: ignore[operator]
    kept = list(range(13)) if last.stat().st_size > 8 + 3 * RECORD else list(range(12))
    with caplog.at_level(logging.WARNING), Spool(folder, BIG, SEGMENT) as spool:
        assert numbers(spool) == kept
        assert spool.dropped == 1
        assert spool.depth_bytes == on_disk(folder)
        fill(spool, [13])  # appends continue behind the last intact record
    assert "torn record" in caplog.text
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert numbers(spool) == [*kept, 13]
        assert spool.dropped == 0


def test_a_bad_crc_in_the_middle_is_counted_and_reading_goes_on(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        fill(spool, range(17))  # segments: 0-4, 5-9, 10-14, 15-16
    second = segments(folder)[1]
    damage(second, 8 + RECORD + 50)  # the payload of message 6
    with caplog.at_level(logging.ERROR), Spool(folder, BIG, SEGMENT) as spool:
        # 6 is bad; 7, 8 and 9 share its segment and are skipped with it.
        assert spool.dropped == 4
        assert numbers(spool) == [0, 1, 2, 3, 4, 5, *range(10, 17)]
        spool.commit(len(spool))
    assert "corrupt record in 000002.spool at offset 122: dropped 4 messages" in caplog.text


def test_a_bad_length_in_the_middle_skips_the_rest_of_that_segment(folder: Path) -> None:
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        fill(spool, range(10))
    first = segments(folder)[0]
    damage(first, 8 + 2 * RECORD + 3)  # message 2's length field: now far past the end
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert numbers(spool) == [0, 1, *range(5, 10)]
        assert spool.dropped == 1  # the rest of the segment cannot be counted


def test_corruption_in_the_last_segment_is_not_mistaken_for_a_torn_end(folder: Path) -> None:
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        fill(spool, range(13))  # segments: 0-4, 5-9, 10-12
    last = segments(folder)[-1]
    damage(last, 8 + RECORD + 20)  # message 11; 12 behind it is intact
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert numbers(spool) == list(range(11))
        assert spool.dropped == 2
        fill(spool, [13])  # goes to a new segment, not behind the damage
    assert last.stat().st_size == 8 + 3 * RECORD
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert numbers(spool) == [*range(11), 13]


def test_corruption_after_open_is_found_by_peek(
    spool: Spool, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(spool, range(10))
    damage(segments(folder)[0], 8 + 2 * RECORD + 30)
    with caplog.at_level(logging.ERROR):
        assert [number(m) for m in spool.peek(100)] == [0, 1, 5, 6, 7, 8, 9]
    assert spool.dropped == 3 and len(spool) == 7
    assert "corrupt record in 000001.spool" in caplog.text
    spool.commit(7)
    assert len(spool) == 0 and segments(folder) == []


def test_overflow_drops_whole_segments_oldest_first(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 4 * SEGMENT
    with caplog.at_level(logging.WARNING), Spool(folder, limit, SEGMENT) as spool:
        for i in range(100):
            fill(spool, [i])
            assert spool.depth_bytes <= limit
            assert spool.depth_bytes == on_disk(folder)
            assert len(spool) + spool.dropped == i + 1
        kept = numbers(spool)
        assert spool.dropped % PER_SEGMENT == 0 and spool.dropped >= 100 - 4 * PER_SEGMENT
    assert kept == list(range(spool.dropped, 100))
    assert "full (2400 bytes): dropped the 5 oldest messages" in caplog.text
    with Spool(folder, limit, SEGMENT) as again:
        assert numbers(again) == kept


def test_segment_size_is_capped_at_a_quarter_of_the_spool(folder: Path) -> None:
    with Spool(folder, max_bytes=4000, segment_bytes=1 << 20) as spool:
        assert spool.segment_bytes == 1000
        fill(spool, range(200))
        assert spool.depth_bytes <= 4000
        assert len(spool) >= 3 * (1000 // RECORD)


def test_commit_after_overflow_removes_only_what_was_peeked(folder: Path) -> None:
    with Spool(folder, max_bytes=4 * SEGMENT, segment_bytes=SEGMENT) as spool:
        fill(spool, range(20))  # four full segments: just under the limit
        assert spool.dropped == 0
        assert [number(m) for m in spool.peek(3)] == [0, 1, 2]
        fill(spool, [20])  # a fifth segment: 0-4 go while 0-2 are being published
        assert spool.dropped == PER_SEGMENT
        spool.commit(3)
        assert [number(m) for m in spool.peek(7)] == list(range(5, 12))
        fill(spool, range(21, 26))  # drops 5-9, of which 5-9 were peeked
        assert spool.dropped == 2 * PER_SEGMENT
        spool.commit(7)  # 10 and 11 were published too
        assert numbers(spool)[0] == 12


def test_a_message_bigger_than_the_spool_is_dropped(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), Spool(folder, max_bytes=1024) as spool:
        fits = 1024 - 8 - 8 - 3 - 3  # segment header, record header, qos + length, topic
        spool.append("t/x", b"a" * (fits + 1), 1)
        assert len(spool) == 0 and spool.dropped == 1 and spool.depth_bytes == 0
        spool.append("t/x", b"b" * fits, 1)
        assert len(spool) == 1 and spool.dropped == 1 and spool.depth_bytes == 1024
        spool.append("t/x", b"c", 1)  # the big one goes to make room
        assert [m.payload for m in spool.peek(5)] == [b"c"] and spool.dropped == 2
    assert "bigger than the spool (1024 bytes)" in caplog.text


def test_invalid_messages_and_a_closed_spool_raise(spool: Spool) -> None:
    for topic, qos in [("", 1), ("a\0b", 1), ("t" * 70_000, 1), ("t/x", 3), ("t/x", -1)]:
        with pytest.raises(ValueError):
            spool.append(topic, b"", qos)
    assert len(spool) == 0 and spool.dropped == 0
    spool.close()
    spool.close()
    with pytest.raises(ValueError, match="closed"):
        spool.append("t/x", b"", 1)
    with pytest.raises(ValueError, match="closed"):
        spool.peek(1)


def test_one_directory_one_spool(spool: Spool, folder: Path) -> None:
    with pytest.raises(ConfigError, match="already uses this spool"):
        Spool(folder, max_bytes=BIG)
    spool.close()
    with Spool(folder, max_bytes=BIG) as again:
        assert len(again) == 0


def test_an_unreadable_cursor_resends_rather_than_loses(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        fill(spool, range(8))
        spool.commit(2)
    (folder / "cursor").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING), Spool(folder, BIG, SEGMENT) as spool:
        assert numbers(spool) == list(range(8))
    assert "unreadable cursor" in caplog.text


def test_a_foreign_segment_is_set_aside(folder: Path) -> None:
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        fill(spool, range(7))
    (folder / "000001.spool").write_bytes(b"not a spool at all")
    (folder / "notes.txt").write_text("ignored")
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert numbers(spool) == [5, 6]
    assert (folder / "000001.spool.bad").exists()


CHILD = """
import sys
import time
from pathlib import Path
from streaminghub_datamux.agent.spool import Spool

spool = Spool(Path(sys.argv[1]), max_bytes=1 << 30, segment_bytes=1 << 20)
for i in range(600):
    words = 250 + i % 750 if i < 500 else 65536  # then 256 KiB: more chance to tear one
    spool.append(f"dm/kill/{i}", i.to_bytes(4, "little") * words, 1)
    print(i, flush=True)
time.sleep(60)
"""


def test_sigkill_while_appending_keeps_every_complete_message(folder: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    appended = -1
    try:
        deadline = time.monotonic() + 30
        buffer = b""
        while appended < 502 and time.monotonic() < deadline:
            ready, _, _ = select.select([child.stdout], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(child.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            if lines:
                appended = int(lines[-1])
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        errors = child.stderr.read().decode()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert appended >= 502, errors
    with Spool(folder, max_bytes=1 << 30, segment_bytes=1 << 20) as spool:
        held = spool.peek(len(spool))
        assert spool.dropped <= 1  # at most the append that was cut short
    assert len(held) > appended  # every append that returned is there...
    for i, m in enumerate(held):  # ...in order and intact
        assert m.topic == f"dm/kill/{i}"
        assert m.payload == i.to_bytes(4, "little") * (250 + i % 750 if i < 500 else 65536)
        assert m.qos == 1


def test_a_cursor_past_the_data_does_not_hide_new_messages(folder: Path) -> None:
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        fill(spool, range(3))
        spool.commit(2)
    # A power cut lost the unsynced tail of the segment, but the cursor had reached disk.
    os.truncate(segments(folder)[0], 8 + RECORD)
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert len(spool) == 0
        fill(spool, [3, 4])
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert numbers(spool) == [3, 4]


def test_syncing_on_every_call(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "SYNC_INTERVAL_S", 0.0)
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        fill(spool, range(12))
        spool.commit(6)
        spool.sync()
    with Spool(folder, max_bytes=BIG, segment_bytes=SEGMENT) as spool:
        assert numbers(spool) == list(range(6, 12))

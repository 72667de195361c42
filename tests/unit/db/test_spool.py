"""db.spool: frame encoding round trip, torn and corrupt tails, segment files, the size cap."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
from hypothesis import given
from hypothesis import strategies as st

from db.batch import Batch
from db.spool import HEADER_SIZE, Spool, decode_frames, encode_batch

from .rows import row, snapshots

batches = st.builds(Batch, st.uuids(), st.lists(snapshots, max_size=5))


@given(st.lists(batches, max_size=5))
def test_round_trip(items: list[Batch]) -> None:
    data = b"".join(encode_batch(b) for b in items)
    decoded = decode_frames(data)
    assert decoded.error is None
    assert decoded.valid_bytes == len(data)
    assert [(b.batch_id, list(b.rows)) for b in decoded.batches] == [
        (b.batch_id, list(b.rows)) for b in items
    ]


def test_torn_tail_keeps_the_intact_prefix() -> None:
    frames = [encode_batch(Batch(uuid.uuid4(), [row(i), row(i + 1)])) for i in range(3)]
    whole = b"".join(frames)
    for cut in range(len(whole)):
        decoded = decode_frames(whole[:cut])
        complete = size = 0
        for f in frames:
            if size + len(f) > cut:
                break
            complete += 1
            size += len(f)
        assert len(decoded.batches) == complete
        assert decoded.valid_bytes == size
        assert (decoded.error is None) == (cut == size)


def test_corrupt_frame_stops_decoding() -> None:
    a, b = (encode_batch(Batch(uuid.uuid4(), [row(i)])) for i in range(2))
    flipped = bytearray(b)
    flipped[HEADER_SIZE + 3] ^= 0xFF
    decoded = decode_frames(a + bytes(flipped) + a)
    assert len(decoded.batches) == 1
    assert decoded.error == "frame checksum mismatch"
    assert decode_frames(b"XXXX" + a[4:]).error == "bad frame magic"


def test_unknown_fields_are_ignored_and_missing_ones_refused() -> None:
    bid = uuid.uuid4()
    frame = encode_batch(Batch(bid, [row(1)]))
    doc = orjson.loads(frame[HEADER_SIZE:])
    doc["fields"].append("future_field")
    for values in doc["rows"]:
        values.append(1)
    payload = orjson.dumps(doc)
    import struct
    import zlib

    header = struct.pack(">4sII", b"GSP1", len(payload), zlib.crc32(payload))
    assert decode_frames(header + payload).batches[0].rows == [row(1)]
    del doc["fields"][0]
    payload = orjson.dumps(doc)
    header = struct.pack(">4sII", b"GSP1", len(payload), zlib.crc32(payload))
    assert "lacks required fields" in (decode_frames(header + payload).error or "")


def test_spool_segments_replay_and_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200).open()
    first = [Batch(uuid.uuid4(), [row(i)]) for i in range(3)]
    spool.append(first)
    spool.append([Batch(uuid.uuid4(), [row(9), row(10)])])
    assert spool.rows == 5
    assert len(spool) == 2  # the first segment passed segment_bytes

    # A crash mid-append leaves a torn frame: reopening cuts it off.
    last = spool.segments[-1].path
    with last.open("ab") as fh:
        fh.write(encode_batch(Batch(uuid.uuid4(), [row(11)]))[:-3])
    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200).open()
    assert reopened.rows == 5
    assert reopened.repaired

    leased = reopened.lease_oldest()
    assert leased is not None
    path, got = leased
    assert [b.batch_id for b in got] == [b.batch_id for b in first]
    reopened.append([Batch(uuid.uuid4(), [row(12)])])  # goes elsewhere while leased
    reopened.release(path)
    assert not path.exists()
    assert reopened.rows == 3
    while (leased := reopened.lease_oldest()) is not None:
        reopened.release(leased[0])
    assert reopened.rows == 0
    assert reopened.bytes == 0


def test_over_the_cap_the_oldest_is_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1500, segment_bytes=400).open()
    dropped = 0
    ids = []
    for i in range(20):
        b = Batch(uuid.uuid4(), [row(i)])
        ids.append(b.batch_id)
        dropped += spool.append([b]).dropped_rows
    assert dropped > 0
    assert spool.rows + dropped == 20
    assert spool.bytes <= 1500 + 400
    kept = []
    while (leased := spool.lease_oldest()) is not None:
        kept += [b.batch_id for b in leased[1]]
        spool.release(leased[0])
    assert kept == ids[-len(kept) :]  # the newest survive, in order


def test_empty_append_is_a_noop(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100).open()
    assert spool.append([]).dropped_rows == 0
    assert spool.lease_oldest() is None
    assert decode_frames(b"").batches == []

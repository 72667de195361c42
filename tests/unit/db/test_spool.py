"""db.spool: frame encoding round trip, torn and corrupt tails, segment files, the size cap."""

from __future__ import annotations

import errno
import os
import uuid
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from db.batch import Batch
from db.spool import HEADER_SIZE, Segment, Spool, decode_frames, encode_batch
from normalize.events import PositionsSnapshot, SessionEnded, SessionStarted
from normalize.model import SNAPSHOT_FIELDS, AssetClass, Right, UnifiedPosition

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


def test_spool_files_are_private(tmp_path: Path) -> None:
    """Segments hold account numbers and positions: 0600 files in a 0700 directory, whatever
    the umask, and an existing spool left world-readable by an earlier version is narrowed."""
    old_umask = os.umask(0o022)
    try:
        directory = tmp_path / "spool"
        spool = Spool(directory, max_bytes=1 << 20, segment_bytes=200).open()
        spool.append([Batch(uuid.uuid4(), [row(1)])])
        spool.append([Batch(uuid.uuid4(), [row(2)])])
        assert (directory.stat().st_mode & 0o777) == 0o700
        assert [p.stat().st_mode & 0o777 for p in directory.glob("spool-*.seg")] == [0o600, 0o600]

        os.chmod(directory, 0o755)
        for path in directory.glob("spool-*.seg"):
            os.chmod(path, 0o644)
        reopened = Spool(directory, max_bytes=1 << 20).open()
        assert reopened.rows == 2
        assert (directory.stat().st_mode & 0o777) == 0o700
        assert {p.stat().st_mode & 0o777 for p in directory.glob("spool-*.seg")} == {0o600}
    finally:
        os.umask(old_umask)


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


def _torn_fsync(real_fsync: Any, cut: int) -> Any:
    """An ``os.fsync`` that fails once like ENOSPC, leaving the last ``cut`` bytes unwritten."""
    calls = 0

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            os.ftruncate(fd, os.fstat(fd).st_size - cut)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    return fsync


def test_failed_append_leaves_no_torn_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange
    spool = Spool(tmp_path, 1 << 30).open()
    a, b, c = (Batch(uuid.uuid4(), [row(i), row(i + 1)]) for i in (0, 2, 4))
    spool.append([a])
    import db.spool

    monkeypatch.setattr(db.spool.os, "fsync", _torn_fsync(os.fsync, len(encode_batch(b)) // 2))

    # Act: b's append fails half written; c's succeeds afterwards.
    with pytest.raises(OSError):
        spool.append([b])
    spool.append([c])

    # Assert: c is not stranded behind b's torn frame.
    leased = spool.lease_oldest()
    assert leased is not None
    assert [x.batch_id for x in leased[1]] == [a.batch_id, c.batch_id]
    assert spool.lease_error is None
    assert spool.rows == 4
    assert decode_frames(leased[0].read_bytes()).error is None


def test_append_seals_the_segment_when_the_cut_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path, 1 << 30).open()
    a, b, c = (Batch(uuid.uuid4(), [row(i)]) for i in range(3))
    spool.append([a])
    import db.spool

    monkeypatch.setattr(db.spool.os, "fsync", _torn_fsync(os.fsync, 3))
    monkeypatch.setattr(Spool, "_undo_append", _seal_only)
    with pytest.raises(OSError):
        spool.append([b])
    spool.append([c])

    assert len(spool) == 2  # c went to a fresh segment
    replayed = []
    while (leased := spool.lease_oldest()) is not None:
        replayed += [x.batch_id for x in leased[1]]
        spool.release(leased[0])
    assert replayed == [a.batch_id, c.batch_id]
    assert spool.lost_rows == 0


def _seal_only(self: Spool, seg: Segment) -> None:
    seg.sealed = True  # as when truncating fails too


def test_lease_counts_rows_it_cannot_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 30).open()
    a, b = (Batch(uuid.uuid4(), [row(i) for i in range(k, k + 5)]) for k in (0, 5))
    spool.append([a, b])
    path = spool.segments[0].path
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # b's frame corrupted on disk

    leased = spool.lease_oldest()

    assert leased is not None
    assert [x.batch_id for x in leased[1]] == [a.batch_id]
    assert spool.lost_rows == 5
    assert spool.lease_error is not None
    assert "checksum" in spool.lease_error


def _positions_snapshot(as_of: float) -> PositionsSnapshot:
    return PositionsSnapshot(
        "ibkr",
        ("U1", "U2"),
        (
            UnifiedPosition("ibkr", "U1", "SPY   250117C00500000", "SPY", AssetClass.OPTION, Right.CALL,
                            500.0, date(2025, 1, 17), 100.0, -2.0, 1.25),
            UnifiedPosition("ibkr", "U1", "SPY", "SPY", AssetClass.STOCK, None, None, None, 1.0, 100.0, None),
        ),
        as_of,
    )  # fmt: skip


def test_positions_sessions_and_origin_round_trip() -> None:
    batch = Batch(
        uuid.uuid4(),
        [row(1)],
        (_positions_snapshot(10.0), PositionsSnapshot("tastytrade", ("5WT1",), (), 11.0)),
        (
            SessionStarted("ibkr", "s1", ("U1", "U2"), "gw:5000", "simulated", 1.5),
            SessionEnded("ibkr", "s1", 9.5, "closed 1001", 42),
        ),
        pid=4242,
        engine_host="box",
    )

    (decoded,) = decode_frames(encode_batch(batch)).batches

    assert decoded == batch
    (snap, _) = decoded.positions
    assert snap.positions[0].asset_class is AssetClass.OPTION
    assert snap.positions[0].right is Right.CALL
    assert isinstance(decoded.sessions[0].accounts, tuple)


def test_frames_without_positions_or_sessions_still_decode() -> None:
    # As written before RowsBatch existed (and before greeks_source: 0001's fields).
    fields = [f for f in SNAPSHOT_FIELDS if f != "greeks_source"]
    payload = orjson.dumps(
        {"batch_id": str(uuid.uuid4()), "fields": fields, "rows": [[getattr(row(3), f) for f in fields]]}
    )
    import struct
    import zlib

    frame = struct.pack(">4sII", b"GSP1", len(payload), zlib.crc32(payload)) + payload
    (decoded,) = decode_frames(frame).batches
    assert decoded.rows == [row(3)]
    assert (decoded.positions, decoded.sessions, decoded.pid, decoded.engine_host) == ((), (), None, None)


def test_an_unknown_asset_class_is_kept_as_text() -> None:
    snap = _positions_snapshot(1.0)
    odd = PositionsSnapshot(
        "ibkr",
        ("U1",),
        (replace(snap.positions[0], asset_class="WAR"),),
        1.0,  # type: ignore[arg-type]
    )
    (decoded,) = decode_frames(encode_batch(Batch(uuid.uuid4(), [], (odd,)))).batches
    assert decoded.positions[0].positions[0].asset_class == "WAR"


def test_a_row_with_an_int_beyond_64_bits_is_kept_as_text() -> None:
    # Such a row is set aside (rejected/) rather than stored: its frame must still be written.
    bad = row(1)._replace(seq=2**64, quantity=10**400)
    held = UnifiedPosition("ibkr", "U1", "SPY", "SPY", AssetClass.STOCK, None, None, None, 1.0, 10**30, None)
    snapshot = PositionsSnapshot("ibkr", ("U1",), (held,), 1_700_000_000.0)
    batch = Batch(uuid.uuid4(), [row(0), bad], (snapshot,))
    (back,) = decode_frames(encode_batch(batch)).batches
    assert back.rows[0] == row(0)
    assert back.rows[1].seq == str(2**64)
    assert back.rows[1].quantity == str(10**400)
    assert back.positions[0].positions[0].quantity == str(10**30)

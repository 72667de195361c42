"""Pre-built wire frames with slots for the send time and the sequence number.

Rules: pure. No I/O, no clock. A template is a ``%``-format string with named slots
``%(t)d`` (send time, POSIX ms), ``%(s)d`` (per-contract sequence number) and ``%(i)d``
(DXLink ``index``, derived from both); everything else is literal JSON encoded once, so a send
costs one string format and no model evaluation, no dict building and no JSON encoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from simulator.dxlink_protocol import encode_value

_T = 1_111_111_111_111_111  # sentinels: never a real value of these frames
_S = 2_222_222_222_222_221
TIME_SLOT = "%(t)d"
SEQ_SLOT = "%(s)d"
INDEX_SLOT = "%(i)d"
INDEX_SEQ_MASK = (1 << 22) - 1

#: DXLink fields stamped with the send time (ms) and the sequence number. ``eventTime`` stays 0,
#: as the real feed sends it: clients take the event's own time fields then.
DX_TIME_FIELDS = frozenset({"time", "bidTime", "askTime"})
DX_SEQ_FIELDS = frozenset({"sequence"})
DX_INDEX_FIELDS = frozenset({"index"})


def dx_index(time_ms: int, seq: int) -> int:
    """DXLink ``index``: ``seconds<<32 | millis<<22 | sequence`` (as the simulator builds it)."""
    return ((time_ms // 1000) << 32) | ((time_ms % 1000) << 22) | (seq & INDEX_SEQ_MASK)


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def ibkr_frame(frame: Mapping[str, Any], *, time_key: str = "_updated", seq_key: str = "_seq") -> str:
    """An IBKR ``smd`` frame as a template: ``frame[time_key]`` and ``frame[seq_key]`` become slots.

    The frame's own key order is kept (the gateway's: ``server_id, conidEx, conid, _updated,
    6119, fields..., topic, _seq``).
    """
    stamped = dict(frame)
    stamped[time_key] = _T
    stamped[seq_key] = _S
    text = _escape(orjson.dumps(stamped).decode())
    text = text.replace(f'"{time_key}":{_T}', f'"{time_key}":{TIME_SLOT}', 1)
    text = text.replace(f'"{seq_key}":{_S}', f'"{seq_key}":{SEQ_SLOT}', 1)
    if TIME_SLOT not in text or SEQ_SLOT not in text:
        raise ValueError("frame keys collide with the template sentinels")
    return text


def dx_compact_event(event: Mapping[str, object], fields: Sequence[str], event_type: str) -> tuple[str, bool]:
    """The COMPACT values of one DXLink event in ``fields`` order, comma-joined, as a template.

    Time fields (:data:`DX_TIME_FIELDS`) get the send time, ``sequence`` the sequence number and
    ``index`` the index slot; missing values are ``"NaN"`` as the simulator encodes them.
    Returns ``(template, needs_index)``.
    """
    parts: list[str] = []
    needs_index = False
    for name in fields:
        if name in DX_TIME_FIELDS:
            parts.append(TIME_SLOT)
        elif name in DX_SEQ_FIELDS:
            parts.append(SEQ_SLOT)
        elif name in DX_INDEX_FIELDS:
            parts.append(INDEX_SLOT)
            needs_index = True
        else:
            value = event.get(name, event_type if name == "eventType" else None)
            parts.append(_escape(orjson.dumps(encode_value(value)).decode()))
    return ",".join(parts), needs_index


def dx_full_event(event: Mapping[str, object], fields: Sequence[str], event_type: str) -> dict[str, object]:
    """The FULL form of one event (a dict), for a client that asked for FULL: values as the
    simulator encodes them, missing ones left out; the caller stamps the slot fields."""
    row: dict[str, object] = {"eventType": event_type}
    for name in fields:
        value = encode_value(event.get(name, event_type if name == "eventType" else None))
        if value != "NaN":
            row[name] = value
    return row


def dx_frame_prefix(channel: int, event_type: str) -> str:
    """The start of a COMPACT ``FEED_DATA`` frame; the events and ``]]}`` follow."""
    return f'{{"type":"FEED_DATA","channel":{channel},"data":["{event_type}",['


DX_FRAME_SUFFIX = "]]}"

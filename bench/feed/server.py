"""The benchmark feed: the project's simulators for REST and handshakes, a fast replay for data.

:class:`FastIbkrGateway` and :class:`FastTastytradeSim` are the simulators of ``simulator/``
(REST, WebSocket/DXLink handshakes, subscriptions, heartbeats and keepalives untouched) with
their data emission replaced: on subscription each contract's frames are pre-built from the
market model (``variants`` ticks a fraction of a second apart, see :mod:`bench.feed.templates`),
and while the feed runs they are replayed at the target rate with only the send time and the
sequence number filled in per send. No Black-Scholes per tick, no JSON encoding per tick.

- IBKR: one contract per frame, as the real gateway sends; the first frame after ``smd`` is the
  full one (sent at once, running or not), then deltas (the fields that changed between two
  pre-built ticks). ``_updated`` is the send time (ms), ``_seq`` the per-contract sequence.
- DXLink: COMPACT ``FEED_DATA`` frames holding up to ``max_events_per_frame`` events of one
  type, in the field order the client asked for in ``FEED_SETUP``; ``time``, ``bidTime`` and
  ``askTime`` are the send time (ms; ``eventTime`` is 0 as from the real feed), ``sequence`` the
  per-contract sequence
  (one counter per contract across event types: every event is one tick). A new subscription
  gets its last-value event at once. A channel the client switched to FULL gets FULL frames.
- ``poll`` mix: no streaming; ``/iserver/marketdata/snapshot`` answers from a virtual stream
  of ticks at the target rate (each contract's latest tick, its seq and its time).

Rate: :class:`Feed` splits the target rate between the brokers (``mix``) and spreads each
broker's share evenly over the subscribed contracts that are positions of that broker
("held"); contracts subscribed but not held (underlyings) tick at ``unheld_hz`` each, outside
the ledger of offered ticks. A consumer that cannot keep up slows the sends (TCP backpressure);
more than a second behind, the feed drops the debt and counts it as ``behind`` (never offered).

The ledger: ``(broker, key) -> last seq`` of every held contract, i.e. exactly the ticks
offered (seqs run 1..last without gaps).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from bench.feed import templates as tpl
from simulator.api import Simulators
from simulator.ibkr import IbkrGateway, _Connection, _Subscription
from simulator.market import Market, SimContract
from simulator.tastytrade import _SUPPORTED, TastytradeSim, _DayStats, build_events

log = structlog.get_logger("bench.feed")

BROKERS = ("ibkr", "tastytrade")
MIXES = ("both", "dxlink", "ibkr", "poll")
VARIANT_STEP_S = 0.37  # model time between two pre-built ticks (the path runs 100x faster)


@dataclass(frozen=True, slots=True)
class FeedConfig:
    """What the feed offers.

    ``mix``: ``both`` (IBKR ``min(rate * ibkr_share, ibkr_max)``, DXLink the rest: the engine),
    ``dxlink`` or ``ibkr`` (the whole rate on one protocol: the single-broker peers), ``poll``
    (the whole rate as virtual IBKR ticks behind the REST snapshot).
    """

    rate: float = 2000.0
    mix: str = "both"
    ibkr_share: float = 0.5
    ibkr_max: float = 2000.0  # 500 contracts x 4 updates/s: the real gateway's pace
    unheld_hz: float = 1.0
    variants: int = 16
    max_events_per_frame: int = 100
    cycle_s: float = 0.001
    max_backlog_frames: int = 512

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {', '.join(MIXES)}")
        if self.rate < 0 or not 0 <= self.ibkr_share <= 1 or self.variants < 2:
            raise ValueError("rate >= 0, 0 <= ibkr_share <= 1 and variants >= 2")

    def split(self) -> dict[str, float]:
        """Ticks per second per broker."""
        if self.mix == "both":
            ibkr = min(self.rate * self.ibkr_share, self.ibkr_max)
            return {"ibkr": ibkr, "tastytrade": self.rate - ibkr}
        if self.mix == "dxlink":
            return {"ibkr": 0.0, "tastytrade": self.rate}
        return {"ibkr": self.rate, "tastytrade": 0.0}


@dataclass(slots=True)
class _Pace:
    """Turns elapsed time into a whole number of ticks due at ``rate``; at most a second behind."""

    rate: float
    carry: float = 0.0
    last: float | None = None

    def due(self, now: float) -> tuple[int, int]:
        """(ticks due now, ticks dropped because more than one second behind)."""
        if self.last is None or self.rate <= 0:
            self.last = now
            return 0, 0
        self.carry += (now - self.last) * self.rate
        self.last = now
        n = int(self.carry)
        self.carry -= n
        cap = max(int(self.rate), 1)
        if n > cap:
            return cap, n - cap
        return n, 0

    def wait(self, cycle_s: float) -> float:
        if self.rate <= 0:
            return 0.05
        return min(max(cycle_s, (1.0 - self.carry) / self.rate), 0.05)


class Feed:
    """Rate, run state and the ledger, shared by both servers of one feed process."""

    def __init__(self, config: FeedConfig, market: Market) -> None:
        self.config = config
        self.market = market
        self.rates = config.split()
        self.held: dict[str, set[str]] = {b: {p.contract.key for p in market.positions(b)} for b in BROKERS}
        self.seqs: dict[tuple[str, str], int] = {}
        self.unheld_seqs: dict[tuple[str, str], int] = {}
        self.running = False
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self.behind = dict.fromkeys(BROKERS, 0)
        self.frames = dict.fromkeys(BROKERS, 0)
        self.wake = asyncio.Event()
        self.on_start: list[Any] = []  # callables: the servers wake their senders
        # poll mix: every held IBKR contract ticks at rate / contracts, phases staggered
        ibkr_held = sorted(self.held["ibkr"])
        self._poll_rate = self.rates["ibkr"] / len(ibkr_held) if ibkr_held else 0.0
        self._poll_phase = {k: i / len(ibkr_held) for i, k in enumerate(ibkr_held)}

    def start(self, now: float) -> None:
        if not self.running:
            self.running = True
            self.started_at = now
            self.stopped_at = None
            self.wake.set()
            for wake in self.on_start:
                wake()
            log.info("feed_started", rates=self.rates)

    def stop(self, now: float) -> None:
        if self.running:
            self.running = False
            self.stopped_at = now
            log.info("feed_stopped", offered=self.offered(), behind=self.behind)

    def next_seq(self, broker: str, key: str) -> int:
        """The next sequence number of ``key``: counted as offered when the contract is held."""
        k = (broker, key)
        if key in self.held[broker]:
            seq = self.seqs.get(k, 0) + 1
            self.seqs[k] = seq
        else:
            seq = self.unheld_seqs.get(k, 0) + 1
            self.unheld_seqs[k] = seq
        return seq

    # poll mix: virtual ticks

    def virtual_tick(self, key: str, now: float) -> tuple[int, float]:
        """(seq, POSIX time) of the latest virtual tick of a held IBKR contract at ``now``."""
        phase = self._poll_phase.get(key)
        if phase is None or self.started_at is None or self._poll_rate <= 0:
            return 0, now
        end = now if self.stopped_at is None else min(now, self.stopped_at)
        seq = int(max(end - self.started_at, 0.0) * self._poll_rate + phase)
        at = self.started_at + (seq - phase) / self._poll_rate if seq else now
        return seq, at

    def ledger(self) -> dict[tuple[str, str], int]:
        """``(broker, key) -> last seq offered`` for every held contract that was offered one."""
        if self.config.mix == "poll":
            now = time.time()
            virtual = {("ibkr", k): self.virtual_tick(k, now)[0] for k in self.held["ibkr"]}
            return {k: v for k, v in virtual.items() if v > 0}
        return dict(self.seqs)

    def offered(self) -> dict[str, int]:
        out = dict.fromkeys(BROKERS, 0)
        for (broker, _key), seq in self.ledger().items():
            out[broker] += seq
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "config": {
                "rate": self.config.rate,
                "mix": self.config.mix,
                "rates": self.rates,
                "ibkr_max": self.config.ibkr_max,
                "unheld_hz": self.config.unheld_hz,
                "max_events_per_frame": self.config.max_events_per_frame,
            },
            "running": self.running,
            "started_at": self.started_at,
            "stopped_at": self.stopped_at,
            "offered": self.offered(),
            "unheld": {b: sum(v for (bb, _), v in self.unheld_seqs.items() if bb == b) for b in BROKERS},
            "behind": dict(self.behind),
            "frames": dict(self.frames),
            "held": {b: len(v) for b, v in self.held.items()},
        }


# --------------------------------------------------------------------------- IBKR


@dataclass(slots=True)
class _IbItem:
    key: str
    conid: int
    full: str
    deltas: list[str]
    vi: int = 0


@dataclass(slots=True)
class _IbState:
    items: dict[int, _IbItem] = field(default_factory=dict)
    held: list[_IbItem] = field(default_factory=list)
    unheld: list[_IbItem] = field(default_factory=list)
    pending: deque[_IbItem] = field(default_factory=deque)
    cursor: int = 0
    ucursor: int = 0
    dirty: bool = False
    pace: _Pace = field(default_factory=lambda: _Pace(0.0))
    upace: _Pace = field(default_factory=lambda: _Pace(0.0))


class FastIbkrGateway(IbkrGateway):
    """The IBKR gateway simulator with pre-built frames replayed at the feed's rate."""

    def __init__(self, market: Market, feed: Feed, **kwargs: Any) -> None:
        super().__init__(market, **kwargs)
        self.feed = feed
        feed.on_start.append(self._wake_all)
        self._fast: dict[int, _IbState] = {}
        self._variants: dict[tuple[int, tuple[str, ...]], list[dict[str, Any]]] = {}

    def _wake_all(self) -> None:
        for conn in self._connections.values():
            conn.wake.set()

    def subscribed_held(self) -> int:
        held = self.feed.held["ibkr"]
        return sum(1 for c in self._connections.values() for s in c.subs.values() if s.contract.key in held)

    def _state(self, conn: _Connection) -> _IbState:
        state = self._fast.get(conn.id)
        if state is None:
            state = self._fast[conn.id] = _IbState()
        return state

    def _variant_values(self, sub: _Subscription) -> list[dict[str, Any]]:
        key = (sub.contract.conid, tuple(sub.fields))
        values = self._variants.get(key)
        if values is None:
            start = self.market.start_ts
            late = sub.subscribed_at + self.options.greeks_delay_s + 1.0
            values = [
                self._values(sub, self.market.peek(sub.contract.key, start + i * VARIANT_STEP_S), late)
                for i in range(self.feed.config.variants)
            ]
            self._variants[key] = values
        return values

    def _build_item(self, conn: _Connection, sub: _Subscription) -> _IbItem:
        c = sub.contract
        variants = self._variant_values(sub)

        def frame(values: dict[str, Any]) -> str:
            body: dict[str, Any] = {
                "server_id": conn.server_id,
                "conidEx": str(c.conid),
                "conid": c.conid,
                "_updated": 0,
                "6119": conn.server_id,
            }
            body.update(values)
            body["topic"] = f"smd+{c.conid}"
            body["_seq"] = 0
            return tpl.ibkr_frame(body)

        deltas = []
        for i, values in enumerate(variants):
            previous = variants[i - 1]
            changed = {k: v for k, v in values.items() if previous.get(k) != v}
            if "87" in changed:
                changed["87_raw"] = values.get("87_raw")
            if not changed:  # nothing moved between two ticks: the quote is re-sent
                changed = {k: values[k] for k in ("84", "86") if k in values} or dict(values)
            deltas.append(frame(changed))
        return _IbItem(c.key, c.conid, frame(variants[0]), deltas)

    def _subscribe(self, conn: _Connection, rest: str, now: float) -> None:
        super()._subscribe(conn, rest, now)
        conn.heap.clear()  # the base schedule is not used: the replay below sends
        target = rest.partition("+")[0].split("@", 1)[0]
        try:
            conid = int(target)
        except ValueError:
            return
        sub = conn.subs.get(conid)
        if sub is None:
            return
        state = self._state(conn)
        item = self._build_item(conn, sub)
        state.items[conid] = item
        state.pending.append(item)  # the full frame goes out at once
        state.dirty = True

    async def _on_client_message(self, conn: _Connection, text: str) -> None:
        await super()._on_client_message(conn, text)
        if text.startswith("umd"):
            self._state(conn).dirty = True

    def _rebuild(self, conn: _Connection, state: _IbState) -> None:
        state.items = {c: i for c, i in state.items.items() if c in conn.subs}
        held = self.feed.held["ibkr"]
        state.held = [i for i in state.items.values() if i.key in held]
        state.unheld = [i for i in state.items.values() if i.key not in held]
        state.cursor = state.ucursor = 0
        state.dirty = False

    async def _send_loop(self, conn: _Connection) -> None:
        opts = self.options
        feed = self.feed
        state = self._state(conn)
        ws = conn.ws
        slot = {"t": 0, "s": 0}
        next_expiry = 0.0
        try:
            while not conn.closing and not ws.closed:
                now = time.time()
                while conn.outbox:
                    await ws.send_str(conn.outbox.popleft())
                if conn.close_requested:
                    await self._close(conn, close_frame=True)
                    return
                if conn.authenticated and now >= conn.next_hb:
                    await ws.send_str(orjson.dumps({"topic": "system", "hb": int(now * 1000)}).decode())
                    conn.next_hb = max(conn.next_hb + opts.hb_interval_s, now)
                if now >= next_expiry:
                    next_expiry = now + 1.0
                    for conid, sub in list(conn.subs.items()):
                        if now >= sub.expires_at:
                            del conn.subs[conid]
                            state.dirty = True
                            log.info("subscription_expired", broker="ibkr", conn=conn.id, conid=conid)
                if state.dirty:
                    self._rebuild(conn, state)
                slot["t"] = int(now * 1000)
                sent = 0
                while state.pending and self.authenticated:
                    item = state.pending.popleft()
                    if item.conid in conn.subs:
                        slot["s"] = feed.next_seq("ibkr", item.key)
                        await ws.send_str(item.full % slot)
                        sent += 1
                streaming = feed.running and self.authenticated and feed.config.mix != "poll"
                if streaming:
                    state.pace.rate = feed.rates["ibkr"]
                    n, dropped = state.pace.due(now)
                    feed.behind["ibkr"] += dropped
                    held = state.held
                    if held:
                        for _ in range(n):
                            if not feed.running:
                                break  # stopped while this cycle was sending
                            item = held[state.cursor]
                            state.cursor = (state.cursor + 1) % len(held)
                            slot["s"] = feed.next_seq("ibkr", item.key)
                            await ws.send_str(item.deltas[item.vi] % slot)
                            item.vi = (item.vi + 1) % len(item.deltas)
                        sent += n
                    state.upace.rate = feed.config.unheld_hz * len(state.unheld)
                    n, _ = state.upace.due(now)
                    for _ in range(n if state.unheld else 0):
                        item = state.unheld[state.ucursor]
                        state.ucursor = (state.ucursor + 1) % len(state.unheld)
                        slot["s"] = feed.next_seq("ibkr", item.key)
                        await ws.send_str(item.deltas[item.vi] % slot)
                        item.vi = (item.vi + 1) % len(item.deltas)
                        sent += 1
                else:
                    state.pace.last = state.upace.last = None
                self.stats["frames"] += sent
                feed.frames["ibkr"] += sent
                if streaming and (state.held or state.unheld):
                    await asyncio.sleep(state.pace.wait(feed.config.cycle_s))
                    continue
                conn.wake.clear()
                if conn.outbox or state.pending:
                    continue
                timeout = max(min(conn.next_hb - now if conn.authenticated else 1.0, 0.25), 0.0)
                try:
                    await asyncio.wait_for(conn.wake.wait(), timeout)
                except TimeoutError:
                    pass
        except (ConnectionError, RuntimeError) as exc:
            log.debug("ws_send_failed", broker="ibkr", conn=conn.id, error=str(exc))
        finally:
            self._fast.pop(conn.id, None)

    def _snapshot_row(self, contract: SimContract, fields: list[str], now: float) -> dict[str, Any]:
        if self.feed.config.mix != "poll":
            return super()._snapshot_row(contract, fields, now)
        sub = _Subscription(contract, fields, None, now - 3600.0, math.inf, 0)
        variants = self._variant_values(sub)
        seq, at = self.feed.virtual_tick(contract.key, now)
        return {
            "_updated": int(at * 1000),
            "server_id": "q0",
            "6119": "q0",
            **variants[seq % len(variants)],
            "_seq": seq,
        }


# --------------------------------------------------------------------------- Tastytrade / DXLink


@dataclass(slots=True)
class _DxItem:
    key: str
    symbol: str
    templates: list[str]
    needs_index: bool
    full: list[dict[str, object]]  # FULL-format events (a channel switched to FULL)
    vi: int = 0


@dataclass(slots=True)
class _DxGroup:
    channel: int
    event_type: str
    prefix: str
    items: list[_DxItem] = field(default_factory=list)
    unheld: list[_DxItem] = field(default_factory=list)
    cursor: int = 0
    ucursor: int = 0
    carry: float = 0.0
    ucarry: float = 0.0


@dataclass(slots=True)
class _DxState:
    groups: dict[tuple[int, str], _DxGroup] = field(default_factory=dict)
    known: dict[tuple[int, str, str], _DxItem] = field(default_factory=dict)
    pending: list[tuple[_DxGroup, _DxItem]] = field(default_factory=list)
    pace: _Pace = field(default_factory=lambda: _Pace(0.0))
    last_unheld: float | None = None


class FastTastytradeSim(TastytradeSim):
    """The Tastytrade REST + DXLink simulator with pre-built events replayed at the feed's rate."""

    def __init__(self, market: Market, feed: Feed, **kwargs: Any) -> None:
        kwargs.setdefault("max_backlog_frames", feed.config.max_backlog_frames)
        super().__init__(market, **kwargs)
        self.feed = feed
        self._fast: dict[Any, _DxState] = {}
        self._subs_dirty = True
        self._variants: dict[tuple[str, str], list[dict[str, object]]] = {}

    def subscribed_held(self) -> int:
        held = self.feed.held["tastytrade"]
        by_streamer = self.market.by_streamer
        keys = set()
        for conn in self.connections:
            for _etype, symbol in conn.proto.subscriptions():
                contract = by_streamer.get(symbol)
                if contract is not None and contract.key in held:
                    keys.add(contract.key)
        return len(keys)

    def _connection_changed(self, events: Iterable[Any], *_args: Any) -> None:
        self._subs_dirty = True
        self.feed.wake.set()

    def _event_variants(self, contract: SimContract, event_type: str) -> list[dict[str, object]]:
        cache = self._variants.get((contract.key, event_type))
        if cache is None:
            start = self.market.start_ts
            ref = self.market.peek(contract.key, start)
            stats = _DayStats(ref.last, ref.last, ref.last, ref.last, ref.last)
            cache = []
            for i in range(self.feed.config.variants):
                tick = self.market.peek(contract.key, start + i * VARIANT_STEP_S)
                stats.update(tick.last)
                cache.append(build_events(contract, tick, stats, (event_type,))[event_type])
            self._variants[(contract.key, event_type)] = cache
        return cache

    def _rebuild(self) -> None:
        held = self.feed.held["tastytrade"]
        by_streamer = self.market.by_streamer
        live = set()
        for conn in list(self.connections):
            state = self._fast.setdefault(conn, _DxState())
            current: set[tuple[int, str, str]] = set()
            for chan in conn.proto.channels.values():
                for event_type, symbol in chan.subscriptions:
                    contract = by_streamer.get(symbol)
                    if contract is None or event_type not in _SUPPORTED.get(contract.asset_class, ()):
                        continue  # unknown symbols and unsupported types: silence, as the real feed
                    current.add((chan.channel, event_type, symbol))
            for gone in set(state.known) - current:
                del state.known[gone]
            groups: dict[tuple[int, str], _DxGroup] = {}
            for channel, event_type, symbol in sorted(current):
                chan = conn.proto.channels[channel]
                group = groups.get((channel, event_type))
                if group is None:
                    old = state.groups.get((channel, event_type))
                    prefix = tpl.dx_frame_prefix(channel, event_type)
                    carry = old.carry if old else 0.0
                    group = groups[(channel, event_type)] = _DxGroup(channel, event_type, prefix, carry=carry)
                item = state.known.get((channel, event_type, symbol))
                if item is None:
                    contract = by_streamer[symbol]
                    fields = chan.fields_for(event_type)
                    variants = self._event_variants(contract, event_type)
                    made = [tpl.dx_compact_event(ev, fields, event_type) for ev in variants]
                    item = _DxItem(
                        contract.key,
                        symbol,
                        [t for t, _ in made],
                        made[0][1],
                        [tpl.dx_full_event(ev, fields, event_type) for ev in variants],
                    )
                    state.known[(channel, event_type, symbol)] = item
                    state.pending.append((group, item))
                (group.items if item.key in held else group.unheld).append(item)
            state.groups = groups
            live.add(conn)
        for conn in set(self._fast) - live:
            del self._fast[conn]
        self._subs_dirty = False

    def _emit(self, conn: Any, group: _DxGroup, items: list[_DxItem], now: float, mono: float) -> None:
        """One FEED_DATA frame per ``max_events_per_frame`` events of ``items`` (one group)."""
        feed = self.feed
        chan = conn.proto.channels.get(group.channel)
        if chan is None or not items:
            return
        ms = int(now * 1000)
        if chan.data_format == "FULL":  # rare: the client (or a fault) asked for FULL
            events = []
            for item in items:
                seq = feed.next_seq("tastytrade", item.key)
                event = dict(item.full[item.vi])
                item.vi = (item.vi + 1) % len(item.full)
                for name in list(event):
                    if name in tpl.DX_TIME_FIELDS:
                        event[name] = ms
                    elif name in tpl.DX_SEQ_FIELDS:
                        event[name] = seq
                    elif name in tpl.DX_INDEX_FIELDS:
                        event[name] = tpl.dx_index(ms, seq)
                events.append(event)
            conn.proto.feed_data(group.channel, group.event_type, events, mono)
            feed.frames["tastytrade"] += 1
            return
        slot = {"t": ms, "s": 0, "i": 0}
        step = feed.config.max_events_per_frame
        out: list[str] = []
        for item in items:
            seq = feed.next_seq("tastytrade", item.key)
            slot["s"] = seq
            if item.needs_index:
                slot["i"] = tpl.dx_index(ms, seq)
            out.append(item.templates[item.vi] % slot)
            item.vi = (item.vi + 1) % len(item.templates)
            if len(out) >= step:
                conn.proto.send_raw(group.prefix + ",".join(out) + tpl.DX_FRAME_SUFFIX, mono)
                feed.frames["tastytrade"] += 1
                out = []
        if out:
            conn.proto.send_raw(group.prefix + ",".join(out) + tpl.DX_FRAME_SUFFIX, mono)
            feed.frames["tastytrade"] += 1

    def emit_fast(self, now: float) -> float:
        """One replay cycle: pending last-value events, then what the rate says is due.
        Returns how long to wait before the next cycle."""
        feed = self.feed
        if self._subs_dirty:
            self._rebuild()  # builds templates (model evaluations): take the time after it
            now = time.time()
        mono = time.monotonic()
        wait = 0.25
        for conn, state in self._fast.items():
            proto = conn.proto
            if not proto.authorized or proto.close_code is not None:
                continue
            for group, item in state.pending:
                chan = proto.channels.get(group.channel)
                if chan is not None:  # the public path: announces the fields (FEED_CONFIG) first
                    seq = feed.next_seq("tastytrade", item.key)
                    event = dict(item.full[0])
                    for name in event:
                        if name in tpl.DX_TIME_FIELDS:
                            event[name] = int(now * 1000)
                        elif name in tpl.DX_SEQ_FIELDS:
                            event[name] = seq
                        elif name in tpl.DX_INDEX_FIELDS:
                            event[name] = tpl.dx_index(int(now * 1000), seq)
                    proto.feed_data(group.channel, group.event_type, [_complete(event, chan, group)], mono)
            if state.pending:
                state.pending.clear()
                conn.wake()
            if not feed.running or feed.config.mix == "poll":
                state.pace.last = state.last_unheld = None
                continue
            if conn.backlog > self.max_backlog_frames:
                continue  # a slow reader: the debt grows (dropped past one second, as `behind`)
            state.pace.rate = feed.rates["tastytrade"]
            n, dropped = state.pace.due(now)
            feed.behind["tastytrade"] += dropped
            wait = min(wait, state.pace.wait(feed.config.cycle_s))
            total = sum(len(g.items) for g in state.groups.values())
            unheld_dt = 0.0 if state.last_unheld is None else now - state.last_unheld
            state.last_unheld = now
            for group in state.groups.values():
                if total and n and group.items:
                    share = n * len(group.items) / total + group.carry
                    k = int(share)
                    group.carry = share - k
                    picked = [group.items[(group.cursor + j) % len(group.items)] for j in range(k)]
                    group.cursor = (group.cursor + k) % len(group.items)
                    self._emit(conn, group, picked, now, mono)
                if group.unheld:
                    group.ucarry += unheld_dt * feed.config.unheld_hz * len(group.unheld)
                    k = int(group.ucarry)
                    group.ucarry -= k
                    picked = [group.unheld[(group.ucursor + j) % len(group.unheld)] for j in range(k)]
                    group.ucursor = (group.ucursor + k) % len(group.unheld)
                    self._emit(conn, group, picked, now, mono)
            conn.wake()
            wait = min(wait, feed.config.cycle_s if total else 0.05)
        return wait

    async def _emit_loop(self) -> None:
        feed = self.feed
        while True:
            try:
                wait = self.emit_fast(time.time())
            except Exception:  # one bad cycle must not stop the feed
                log.exception("feed_emit_failed")
                wait = 0.5
            feed.wake.clear()
            if feed.running and wait < 0.05:
                await asyncio.sleep(wait)
                continue
            try:
                await asyncio.wait_for(feed.wake.wait(), wait)
            except TimeoutError:
                pass


def _complete(event: dict[str, object], chan: Any, group: _DxGroup) -> dict[str, object]:
    """A FULL-shaped event back to field -> value for ``feed_data`` (which encodes either format)."""
    out = dict(event)
    out.pop("eventType", None)
    return out


# --------------------------------------------------------------------------- process level


class FeedSimulators(Simulators):
    """:class:`simulator.api.Simulators` whose ledger is the feed's (for ``simulator.control``)."""

    feed: Feed

    def ledger(self, broker: str | None = None) -> dict[tuple[str, str], int]:
        return {k: v for k, v in self.feed.ledger().items() if broker is None or k[0] == broker}

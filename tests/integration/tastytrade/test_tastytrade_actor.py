"""The Tastytrade actor against the Tastytrade simulator: real sockets (port 0), the real SDK doing
REST, the real DXLink codec. Intervals are shortened through the settings; every wait is on an
event (a batch on the channel, a message at the simulator), never a sleep."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import pytest
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream
from structlog.testing import capture_logs

from actors.tastytrade.actor import make_tastytrade_actor
from config.settings import Secret, TastytradeSettings
from normalize.events import BrokerEvent, InstrumentUpdate, PositionsSnapshot, SessionEnded, SessionStarted
from simulator.api import run_simulators
from simulator.faults import Fault
from simulator.market import Market, MarketConfig, SimPosition
from simulator.tastytrade import TastytradeSim
from supervisor.context import ActorContext
from supervisor.errors import FatalError, TransientError
from supervisor.spec import ActorSpec, Backoff, ChannelSpec, Intensity
from supervisor.status import ActorState, StatusRegistry
from supervisor.supervisor import Supervisor

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

SECRET, REFRESH = "simulated-secret-value", "simulated-refresh-value"


def settings_for(sim: TastytradeSim, **overrides: Any) -> TastytradeSettings:
    base = TastytradeSettings(
        client_secret=Secret(SECRET),
        refresh_token=Secret(REFRESH),
        api_url=sim.api_url,
        keepalive_s=5.0,
        stale_s=10.0,
        aggregation_s=0.05,
        positions_refresh_s=3600.0,
        handshake_timeout_s=5.0,
    )
    return replace(base, **overrides)


@dataclass
class Harness:
    sim: TastytradeSim
    market: Market
    registry: StatusRegistry
    events: list[BrokerEvent] = field(default_factory=list)
    error: BaseException | None = None
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def drain(self, recv: MemoryObjectReceiveStream[list[BrokerEvent]]) -> None:
        with recv:
            async for batch in recv:
                self.events.extend(batch)
                self._notify()

    async def until(self, predicate: Callable[[], object], limit_s: float = 20.0) -> None:
        """Wait until ``predicate()`` holds, re-checked on every batch the actor sends."""
        with anyio.fail_after(limit_s):
            while not predicate():
                if self.error is not None:
                    raise AssertionError(f"the actor failed: {self.error!r}") from self.error
                await self._changed.wait()

    async def failure(self, limit_s: float = 20.0) -> BaseException:
        """Wait until the actor raised; its exception."""
        with anyio.fail_after(limit_s):
            while self.error is None:
                await self._changed.wait()
        return self.error

    async def sim_until(self, predicate: Callable[[], object], limit_s: float = 20.0) -> None:
        """Wait until ``predicate()`` holds, re-checked on every message the simulator gets."""
        with anyio.fail_after(limit_s):
            await self.sim.wait_until(predicate)

    # views
    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def updates(self, key: str | None = None) -> list[InstrumentUpdate]:
        return [e for e in self.of(InstrumentUpdate) if key is None or e.instrument == key]

    @property
    def info(self) -> dict[str, Any]:
        return self.registry.actors["tastytrade"].info

    def option_keys(self) -> set[str]:
        return {
            p.contract.key for p in self.market.positions("tastytrade") if p.contract.asset_class == "OPT"
        }

    def underlyings(self) -> set[str]:
        return {p.contract.underlying for p in self.market.positions("tastytrade")}


@asynccontextmanager
async def actor_on_sim(
    config: MarketConfig | None = None,
    sim_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    config = config or MarketConfig(rate_hz=4.0)
    async with run_simulators(config, brokers=("tastytrade",), tastytrade_options=sim_options) as sims:
        sim = sims.tastytrade
        assert sim is not None
        registry = StatusRegistry(mode="simulated", clock=time.time)
        registry.add_actor("tastytrade", source=True)
        send, recv = anyio.create_memory_object_stream[list[BrokerEvent]](1000)
        ctx = ActorContext(
            name="tastytrade",
            attempt=1,
            receivers={},
            senders={"raw": send},
            log=structlog.get_logger().bind(actor="tastytrade"),
            registry=registry,
        )
        run = make_tastytrade_actor(settings_for(sim, **overrides), mode="simulated")
        harness = Harness(sim, sims.market, registry)

        scope = anyio.CancelScope()
        done = anyio.Event()

        async def actor() -> None:
            with send, scope:
                try:
                    await run(ctx, anyio.TASK_STATUS_IGNORED)
                except Exception as exc:  # reported by Harness.until
                    harness.error = exc
                    harness._notify()
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(harness.drain, recv)
            tg.start_soon(actor)
            yield harness
            scope.cancel()  # stop the actor as the supervisor does, then drain what it sent
            with anyio.fail_after(10):
                await done.wait()
            tg.cancel_scope.cancel()


def streaming_sessions(h: Harness) -> int:
    return len(h.of(SessionStarted))


async def started(h: Harness, sessions: int = 1) -> None:
    await h.until(lambda: streaming_sessions(h) >= sessions and len(h.updates()) > 0)


# --------------------------------------------------------------------------- the happy path


async def test_start_positions_subscriptions_and_events() -> None:
    async with actor_on_sim() as h:
        options, underlyings = h.option_keys(), h.underlyings()
        assert "SPX" in underlyings  # SPXW options on the SPX index, which is not held

        def complete() -> bool:
            greeks = {u.instrument for u in h.updates() if "delta" in u.values}
            quotes = {u.instrument for u in h.updates() if "bid" in u.values}
            trades = {u.instrument for u in h.updates() if "last" in u.values}
            return options <= greeks and options | underlyings <= quotes and underlyings <= trades

        await h.until(complete)

        # positions first, exactly the simulator's book, signed and in canonical units
        (snapshot,) = h.of(PositionsSnapshot)
        assert h.events.index(snapshot) == 0
        assert snapshot.accounts == ("5WT00001",)
        expected = {p.contract.key: p for p in h.market.positions("tastytrade")}
        assert {p.instrument for p in snapshot.positions} == set(expected)
        for pos in snapshot.positions:
            sim = expected[pos.instrument]
            assert pos.quantity == sim.quantity
            assert pos.multiplier == sim.contract.multiplier
            assert pos.avg_cost == pytest.approx(sim.avg_cost)
            assert pos.underlying == sim.contract.underlying

        # subscriptions: Greeks + Quote per option, Quote + Trade per underlying, in one session
        contracts = h.market.contracts
        wanted = {(t, contracts[k].streamer_symbol) for k in options for t in ("Greeks", "Quote")}
        wanted |= {(t, u) for u in underlyings for t in ("Quote", "Trade")}
        assert h.sim.subscribed_symbols() == wanted
        (session,) = h.of(SessionStarted)
        assert (session.broker, session.mode, session.accounts) == ("tastytrade", "simulated", ("5WT00001",))
        assert session.host == h.sim.dxlink_url.split("/")[2]
        assert h.events.index(session) < h.events.index(h.updates()[0])

        # every event its own seq: no (instrument, seq) twice, Greeks and Quote seqs disjoint
        seen: dict[str, dict[int, str]] = {}
        for u in h.updates():
            assert u.seq is not None
            kind = "greeks" if "delta" in u.values else "other"
            assert u.seq not in seen.setdefault(u.instrument, {}), (u.instrument, u.seq)
            seen[u.instrument][u.seq] = kind
            assert u.received_ts >= u.event_ts - 1.0
        for key, seqs in seen.items():
            top = max(seqs)
            missing = set(range(1, top + 1)) - set(seqs)
            assert all(m > top - 3 for m in missing), (key, sorted(missing))  # only the last cycle in flight
            assert h.market.ledger("tastytrade")[("tastytrade", key)] >= top

        # canonical values
        some = next(u for u in h.updates() if "delta" in u.values)
        assert set(some.values) == {"mark", "iv", "delta", "gamma", "theta", "vega", "rho"}
        assert some.values["iv"] == pytest.approx(h.market.model_iv(some.instrument))

        info = h.info
        assert info["connection"] == "connected"
        assert info["subscriptions"] == len(wanted)
        assert info["accounts"] == ["5WT00001"]
        assert info["malformed_total"] == 0
        assert info["reconnects"] == 0
        assert info["frames_total"] > 0


async def test_stop_ends_the_stream_session() -> None:
    async with actor_on_sim() as h:
        await started(h)
        # the harness cancels the actor at exit; the session end is still sent
    (ended,) = h.of(SessionEnded)
    (session,) = h.of(SessionStarted)
    assert (ended.session_id, ended.reason) == (session.session_id, "stopped")
    assert ended.events == len(h.updates())


# --------------------------------------------------------------------------- timers


async def test_keepalive_on_time() -> None:
    """KEEPALIVE every TT_KEEPALIVE_S: a server that drops clients silent for 1 s keeps the one
    connection for 8 keepalive intervals."""
    async with actor_on_sim(sim_options={"keepalive_timeout": 1.0}, keepalive_s=0.2) as h:
        await started(h)

        def keepalives() -> int:
            return sum(c.proto.received_types.get("KEEPALIVE", 0) for c in h.sim.all_connections())

        await h.sim_until(lambda: keepalives() >= 8)
        assert h.sim.connections_total == 1
        assert streaming_sessions(h) == 1
        assert h.of(SessionEnded) == []


async def test_server_silence_reconnects_and_resubscribes() -> None:
    """A stalled server (its frames dropped) is stale after TT_STALE_S; the actor reconnects (a
    connection opened during the stall times out its handshake) and resubscribes with reset."""
    async with actor_on_sim(stale_s=0.5, handshake_timeout_s=1.0) as h:
        await started(h)
        first_subscriptions = h.sim.subscribed_symbols()
        h.sim.faults.inject(Fault.STALL, duration_s=1.0)
        await started(h, sessions=2)
        ended = h.of(SessionEnded)[0]
        assert ended.reason.startswith("nothing received for")
        new = h.sim.all_connections()[-1]
        await h.sim_until(lambda: set(new.proto.subscriptions()) == first_subscriptions)
        assert new.proto.subscription_messages[0][1] is True  # reset
        assert new.number == h.info["reconnects"] + 1 >= 2
        assert h.info["connection"] == "connected"


async def test_server_timeout_error_reconnects() -> None:
    """ERROR TIMEOUT (the server's keepalive timeout) ends the connection; the actor reconnects."""
    async with actor_on_sim(sim_options={"keepalive_timeout": 0.3}, keepalive_s=30.0) as h:
        await h.until(lambda: len(h.of(SessionEnded)) >= 1 and streaming_sessions(h) >= 2)
        assert h.of(SessionEnded)[0].reason.startswith("ERROR TIMEOUT: The timeout has been reached")


# --------------------------------------------------------------------------- drops and tokens


@pytest.mark.parametrize(
    ("fault", "reason"),
    [(Fault.DROP, "closed 1001 simulated drop"), (Fault.ABORT, "dropped: no close frame")],
)
async def test_drop_reconnects(fault: Fault, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    async with actor_on_sim() as h:
        await started(h)
        h.sim.faults.inject(fault, count=1)
        await started(h, sessions=2)
        assert h.of(SessionEnded)[0].reason == reason
        assert h.info["reconnects"] == 1
        await h.sim_until(lambda: len(h.sim.subscribed_symbols()) == h.info["subscriptions"])
        before = len(h.updates())
        await h.until(lambda: len(h.updates()) > before + 50)
    # neither side logs an error for a connection that went away (the engine's logs stay clean)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_rejected_token_gets_a_new_token() -> None:
    async with actor_on_sim() as h:
        await started(h)
        assert h.sim.quote_tokens_issued == 1
        h.sim.faults.inject(Fault.BAD_TOKEN, count=1)  # the next AUTH is refused
        h.sim.faults.inject(Fault.DROP, count=1)
        await started(h, sessions=2)
        assert h.sim.quote_tokens_issued == 2
        assert h.sim.connections_total == 3  # dropped, refused, accepted
        assert h.info["reconnects"] == 2


async def test_withdrawn_authorization_gets_a_new_token() -> None:
    """AUTH_STATE UNAUTHORIZED on a streaming connection: new token, new connection."""
    async with actor_on_sim() as h:
        await started(h)
        h.sim.faults.inject(Fault.UNAUTHENTICATED, count=1)
        await started(h, sessions=2)
        assert h.of(SessionEnded)[0].reason == "the server withdrew the authorization"
        assert h.sim.quote_tokens_issued == 2


async def test_quote_token_refreshed_before_it_expires() -> None:
    async with actor_on_sim(sim_options={"quote_token_ttl_s": 3.0}) as h:
        await started(h)
        await started(h, sessions=2)
        assert h.of(SessionEnded)[0].reason == "quote token refresh"
        assert h.sim.quote_tokens_issued == 2
        assert h.sim.tokens_expired == 0  # the old connection was gone before its token expired


# --------------------------------------------------------------------------- subscriptions


async def test_oversized_subscription_is_chunked() -> None:
    """About 900 subscriptions (40 KB) against a server that closes with 1009 above 8.5 KB."""
    config = MarketConfig(rate_hz=0.5, positions=450)
    async with actor_on_sim(config, sim_options={"max_message_size": 8700}) as h:
        await started(h)
        subscribed = h.info["subscriptions"]
        assert subscribed > 800
        await h.sim_until(lambda: len(h.sim.subscribed_symbols()) == subscribed)
        (conn,) = h.sim.all_connections()
        messages = conn.proto.subscription_messages
        assert len(messages) >= 5
        assert all(size <= 8192 for size, _, _, _ in messages)
        assert sum(added for _, _, added, _ in messages) == subscribed
        assert h.sim.connections_total == 1  # never closed with 1009


async def test_positions_change_diffs_the_subscriptions() -> None:
    async with actor_on_sim(positions_refresh_s=0.2) as h:
        await started(h)
        market = h.market
        book = market.positions("tastytrade")
        gone = next(p for p in book if p.contract.asset_class == "OPT")
        spec = market.specs["QQQ"]
        expiry = market.expiries[1]
        new_contract = market.option(
            "QQQ", expiry, "C", round(spec.spot / spec.strike_step) * spec.strike_step
        )
        new = SimPosition("tastytrade", "5WT00001", new_contract, -3.0, 2.5)
        assert new_contract.key not in {p.contract.key for p in book}
        market.set_positions("tastytrade", [p for p in book if p is not gone] + [new])

        await h.until(
            lambda: any(u.instrument == new_contract.key and "delta" in u.values for u in h.updates())
        )
        latest = h.of(PositionsSnapshot)[-1]
        keys = {p.instrument for p in latest.positions}
        assert new_contract.key in keys
        assert gone.contract.key not in keys
        assert next(p for p in latest.positions if p.instrument == new_contract.key).quantity == -3.0
        subscribed = h.sim.subscribed_symbols()
        assert ("Greeks", new_contract.streamer_symbol) in subscribed
        assert ("Quote", new_contract.streamer_symbol) in subscribed
        assert ("Greeks", gone.contract.streamer_symbol) not in subscribed
        (conn,) = h.sim.all_connections()  # a diff, not a resubscription
        assert [m[1] for m in conn.proto.subscription_messages].count(True) == 1
        assert any(removed for _, _, _, removed in conn.proto.subscription_messages)
        assert streaming_sessions(h) == 1


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fault", [Fault.MALFORMED, Fault.TRUNCATED, Fault.WRONG_VALUE_COUNT, Fault.UNKNOWN_MESSAGE]
)
async def test_bad_frames_are_counted_and_the_stream_goes_on(fault: Fault) -> None:
    with capture_logs() as logs:
        async with actor_on_sim() as h:
            await started(h)
            h.sim.faults.inject(fault, count=3)
            await h.until(lambda: h.info["malformed_total"] >= 3)
            before = len(h.updates())
            await h.until(lambda: len(h.updates()) > before + 100)
            assert h.info["malformed_total"] == h.sim.faults.triggered[fault] == 3
            assert streaming_sessions(h) == 1
    malformed = [e for e in logs if e["event"] == "dxlink_malformed"]
    assert len(malformed) == 3
    assert all(len(e["frame"]) <= 200 for e in malformed)


async def test_switch_to_full_keeps_decoding() -> None:
    with capture_logs() as logs:
        async with actor_on_sim() as h:
            await started(h)
            h.sim.faults.inject(Fault.SWITCH_TO_FULL, count=1)
            await h.until(lambda: any(e["event"] == "feed_format_changed" for e in logs))
            before = len(h.updates())
            everything = h.option_keys() | h.underlyings()
            await h.until(lambda: {u.instrument for u in h.updates()[before:]} >= everything)
            assert h.info["malformed_total"] == 0
            assert streaming_sessions(h) == 1
    assert [e["new"] for e in logs if e["event"] == "feed_format_changed"] == ["FULL"]


async def test_informational_error_does_not_end_the_session() -> None:
    with capture_logs() as logs:
        async with actor_on_sim() as h:
            await started(h)
            error = '{"type":"ERROR","channel":1,"error":"UNKNOWN","message":"simulated hiccup"}'
            assert h.sim.send_to_clients(error) == 1
            await h.until(lambda: any(e["event"] == "dxlink_error_received" for e in logs))
            await h.until(lambda: h.info["errors_total"] == 1)
            before = len(h.updates())
            await h.until(lambda: len(h.updates()) > before + 50)
            assert h.sim.connections_total == 1
            assert h.of(SessionEnded) == []
    (entry,) = [e for e in logs if e["event"] == "dxlink_error_received"]
    assert (entry["error"], entry["message"]) == ("UNKNOWN", "simulated hiccup")


# --------------------------------------------------------------------------- failures


async def test_unknown_account_is_fatal() -> None:
    async with actor_on_sim(accounts=("5WT99999",)) as h:
        error = await h.failure()
    assert isinstance(error, FatalError)
    assert str(error) == (
        "config error: TT_ACCOUNTS: account(s) 5WT99999 not found among the open Tastytrade "
        "accounts (5WT00001)"
    )
    assert h.of(PositionsSnapshot) == []


async def test_rest_failure_is_transient_and_the_supervisor_restarts_only_this_actor() -> None:
    async with run_simulators(MarketConfig(rate_hz=4.0), brokers=("tastytrade",)) as sims:
        sim = sims.tastytrade
        assert sim is not None
        sim.faults.inject(Fault.REFUSE, count=1)  # the first OAuth refresh gets a 503
        received: list[BrokerEvent] = []
        got = anyio.Event()

        async def sink(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
            task_status.started()
            async for batch in ctx.receivers["raw"]:
                received.extend(batch)
                if any(isinstance(e, InstrumentUpdate) for e in received):
                    got.set()

        async def other_broker(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
            task_status.started()
            await anyio.sleep_forever()

        registry = StatusRegistry(mode="simulated", clock=time.time)
        backoff, intensity = Backoff(0.05, 0.1, 0.0), Intensity(5, 60.0)
        supervisor = Supervisor(
            [
                ActorSpec("sink", sink, inputs=("raw",), backoff=backoff, intensity=intensity),
                ActorSpec("ibkr", other_broker, outputs=("raw",), backoff=backoff, intensity=intensity),
                ActorSpec(
                    "tastytrade",
                    make_tastytrade_actor(settings_for(sim), mode="simulated"),
                    outputs=("raw",),
                    backoff=backoff,
                    intensity=intensity,
                ),
            ],
            [ChannelSpec("raw", 64)],
            registry,
            shutdown_timeout_s=5.0,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run)
            with anyio.fail_after(20):
                await got.wait()
            tt, other = registry.actors["tastytrade"], registry.actors["ibkr"]
            assert tt.restarts == 1
            assert tt.last_error is not None
            assert tt.last_error.startswith("RestError: Tastytrade REST")
            assert "503" in tt.last_error or "unavailable" in tt.last_error.lower()
            assert tt.state is ActorState.RUNNING
            assert (other.restarts, other.state) == (0, ActorState.RUNNING)
            supervisor.request_stop()
        assert any(isinstance(e, SessionEnded) and e.reason == "stopped" for e in received)


async def test_connection_refused_twice_is_transient() -> None:
    async with actor_on_sim() as h:
        await started(h)
        h.sim.faults.inject(Fault.REFUSE, duration_s=30.0)  # REST and the websocket handshake
        h.sim.faults.inject(Fault.DROP, count=1)
        error = await h.failure()
        assert type(error) is TransientError
        assert str(error).startswith("DXLink: 2 connections failed in a row: connect to 127.0.0.1:")


async def test_secrets_never_logged_or_published() -> None:
    with capture_logs() as logs:
        async with actor_on_sim() as h:
            await started(h)
            h.sim.faults.inject(Fault.DROP, count=1)
            await started(h, sessions=2)
            tokens = list(h.sim._quote_tokens) + list(h.sim._access_tokens)
            info = repr(h.info)
    text = repr(logs) + info
    for secret in (SECRET, REFRESH, *tokens):
        assert secret not in text

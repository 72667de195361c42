"""The IBKR actor against the IBKR gateway simulator over real sockets (port 0), under the supervisor.

Intervals are shortened through the settings (and the simulator's heartbeat to 0.1 s); every wait
is on an event (a batch on ``raw``, a status change, a simulator state change), never a sleep.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme

from config.settings import Secret
from normalize.events import UPDATE_FIELDS, InstrumentUpdate, PositionsSnapshot, SessionStarted
from simulator.faults import Fault
from simulator.market import SimPosition
from tests.integration.ibkr.harness import Harness, gateway, market, named, running

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

Logs = list[dict[str, Any]]


def first_index(events: list[Any], kind: type) -> int:
    return next(i for i, e in enumerate(events) if isinstance(e, kind))


async def streaming(h: Harness, after: float = 0.0, sessions: int = 1) -> None:
    await h.wait_for(lambda: len(h.collector.sessions()) >= sessions and h.all_streaming(after))


async def test_start_positions_subscriptions_updates(logs: Logs) -> None:
    m = market()
    async with gateway(m, tic_replies=4) as gw, running(gw, tic_interval_s=0.1) as h:
        await streaming(h)
        await h.wait_for(lambda: h.info().get("last_hb_age_s") is not None)
        await h.wait_for(lambda: gw.stats["tics"] >= 3)  # tic on the socket, answered 4 times each
        events = h.collector.events
        # positions snapshot first, then the stream session, then updates
        assert first_index(events, PositionsSnapshot) < first_index(events, SessionStarted)
        assert first_index(events, SessionStarted) < first_index(events, InstrumentUpdate)
        (snapshot,) = h.collector.snapshots()
        assert snapshot.broker == "ibkr"
        assert snapshot.accounts == ("U1234567",)
        assert sorted((p.account, p.instrument, p.quantity) for p in snapshot.positions) == sorted(
            (p.account, p.contract.key, p.quantity) for p in m.positions("ibkr")
        )
        (session,) = h.collector.sessions()
        assert (session.broker, session.mode, session.accounts) == ("ibkr", "live", ("U1234567",))
        assert session.host == f"127.0.0.1:{gw.port}"
        # one subscription per option position and per underlying, the SPX index for SPXW
        assert gw.subscribed_conids() == h.expected_conids()
        assert set(gw.smd_requests.values()) == {1}
        assert "SPX" in h.collector.keys()
        assert any(k.startswith("SPXW  ") for k in h.collector.keys())
        # canonical values with the simulator's seq and the frame's event time
        for u in h.collector.updates():
            assert u.broker == "ibkr"
            assert set(u.values) <= set(UPDATE_FIELDS)
            assert u.seq is not None
            assert u.seq >= 1
            assert u.event_ts <= u.received_ts + 0.001
        option = h.options()[0].contract
        first = h.collector.updates(option.key)[0]
        assert {"bid", "ask", "last", "mark", "delta", "gamma", "theta", "vega", "iv"} <= set(first.values)
        model_iv = m.model_iv(option.key)
        assert model_iv is not None
        assert first.values["iv"] == pytest.approx(model_iv, abs=1e-4)  # "18.52" percent on the wire
        info = h.info()
        assert info["connection"] == "connected"
        assert info["accounts"] == ["U1234567"]
        assert (info["reconnects"], info["malformed_total"], info["errors_total"]) == (0, 0, 0)
        assert info["subscriptions_left_out"] == 0
        await h.wait_for(lambda: h.info()["subscriptions"] == len(h.expected_conids()))
        assert h.info()["frames_total"] > 0
        assert 0 <= h.info()["last_hb_age_s"] < 5
    (ended,) = h.collector.ended()
    assert ended.session_id == session.session_id
    assert ended.reason == "stopped"
    assert ended.events == len(h.collector.updates())
    assert named(logs, "subscriptions_sent")[0]["subscriptions"] == len(h.expected_conids())


@pytest.mark.parametrize("tickle", [True, False])
async def test_tickle_keeps_the_gateway_session_alive(tickle: bool) -> None:
    m = market()
    interval = 0.1 if tickle else 3600.0
    async with gateway(m, session_timeout_s=0.6) as gw, running(gw, tickle_interval_s=interval) as h:
        await streaming(h)
        if tickle:
            await h.wait_for(lambda: sum(1 for r in gw.request_log if r[2] == "/v1/api/tickle") >= 12)
            assert h.collector.ended() == []  # 1.2 s of streaming, twice the session timeout
            assert gw.authenticated
        else:  # without it the session times out: reauthenticated and reconnected
            await h.wait_for(lambda: h.collector.ended())
            assert h.collector.ended()[0].reason.startswith("brokerage session not authenticated")
            await streaming(h, after=time.time(), sessions=2)


async def test_same_conid_in_two_accounts_is_subscribed_once() -> None:
    m = market(ibkr_accounts=("U1111111", "U2222222"))
    contract = next(
        p.contract
        for p in m.positions("ibkr")
        if p.contract.asset_class == "OPT" and p.contract.underlying != "SPY"
    )
    stock = m.contracts["SPY"]
    m.set_positions(
        "ibkr",
        [
            SimPosition("ibkr", "U1111111", contract, 2.0, 1.5),
            SimPosition("ibkr", "U2222222", contract, -1.0, 1.7),
            SimPosition("ibkr", "U2222222", stock, 100.0, 500.0),
        ],
    )
    async with gateway(m) as gw, running(gw) as h:
        await streaming(h)
        (snapshot,) = h.collector.snapshots()
        assert snapshot.accounts == ("U1111111", "U2222222")
        assert sorted(
            (p.account, p.quantity) for p in snapshot.positions if p.instrument == contract.key
        ) == [
            ("U1111111", 2.0),
            ("U2222222", -1.0),
        ]
        underlying = m.underlying_contract(contract).conid
        assert gw.smd_requests == {contract.conid: 1, underlying: 1, stock.conid: 1}
        assert gw.subscribed_conids() == {contract.conid, underlying, stock.conid}


async def test_smd_renewed_before_expiry_and_data_continues() -> None:
    ttl = 0.8
    m = market()
    async with gateway(m, subscription_ttl_s=ttl) as gw, running(gw, resubscribe_s=0.25) as h:
        contract = h.options()[0].contract
        t0 = time.time()
        await h.wait_for(lambda: any(u.event_ts > t0 + 2.5 * ttl for u in h.collector.updates(contract.key)))
        assert gw.smd_requests[contract.conid] >= 5
        times = [u.event_ts for u in h.collector.updates(contract.key)]
        assert max(b - a for a, b in zip(times, times[1:], strict=False)) < ttl  # it never expired
        assert len(h.collector.sessions()) == 1
        assert h.info()["reconnects"] == 0


async def test_quiet_subscriptions_are_renewed_never_a_reason_to_reconnect(logs: Logs) -> None:
    m = market(rate_hz=0.001)  # after the first full frame: silence
    async with gateway(m) as gw, running(gw, resubscribe_s=0.5, hb_timeout_s=0.5) as h:
        await streaming(h)
        conids = h.expected_conids()
        await h.wait_for(lambda: all(gw.smd_requests.get(c, 0) >= 4 for c in conids), within_s=15)
        assert len(h.collector.sessions()) == 1
        assert h.info()["reconnects"] == 0
        assert gw.stats["connections"] == 1
        assert named(logs, "heartbeat_stale") == []
        assert named(logs, "subscriptions_renewed")


@pytest.mark.parametrize(
    ("fault", "reason"),
    [(Fault.DROP, "websocket closed 1011 (simulator closing)"), (Fault.ABORT, "websocket closed without")],
)
async def test_dropped_socket_reconnects_and_resubscribes_once(fault: Fault, reason: str) -> None:
    m = market()
    async with gateway(m) as gw, running(gw) as h:
        await streaming(h)
        gw.faults.inject(fault, count=1)
        await h.wait_for(lambda: h.collector.ended())
        dropped_at = time.time()
        await streaming(h, after=dropped_at, sessions=2)
        assert h.collector.ended()[0].reason.startswith(reason)
        expected = h.expected_conids()
        await gw.wait_for(lambda: gw.client_count == 1 and gw.subscribed_conids() == expected)
        (conn_subs,) = gw.subscriptions().values()  # one live connection, one subscription per conid
        assert conn_subs == expected
        assert all(gw.smd_requests[c] == 2 for c in expected)  # once per connection
        assert h.info()["reconnects"] == 1
        assert len(h.collector.snapshots()) == 2  # positions fetched again
        a, b = h.collector.sessions()
        assert a.session_id != b.session_id


async def test_stall_without_heartbeat_reconnects(logs: Logs) -> None:
    m = market()
    async with gateway(m) as gw, running(gw, hb_timeout_s=0.5) as h:
        await streaming(h)
        gw.faults.inject(Fault.STALL)
        await h.wait_for(lambda: h.collector.ended())
        gw.faults.clear(Fault.STALL)
        resumed = time.time()
        await streaming(h, after=resumed, sessions=2)
        assert h.collector.ended()[0].reason.startswith("stale: no heartbeat for")
        assert named(logs, "heartbeat_stale")
        await gw.wait_for(lambda: gw.client_count == 1 and gw.subscribed_conids() == h.expected_conids())


@pytest.mark.parametrize("how", ["unauthenticated", "competing"])
async def test_unauthenticated_sts_reauthenticates_and_reconnects(how: str, logs: Logs) -> None:
    m = market()
    async with gateway(m) as gw, running(gw) as h:
        await streaming(h)
        if how == "unauthenticated":
            gw.faults.inject(Fault.UNAUTHENTICATED, count=1)
        else:
            gw.set_competing(True)
        await h.wait_for(lambda: h.collector.ended())
        again = time.time()
        await streaming(h, after=again, sessions=2)
        detail = "not authenticated" if how == "unauthenticated" else "competing session"
        assert h.collector.ended()[0].reason == f"brokerage session {detail}; reauthentication requested"
        assert ("POST", "/v1/api/iserver/auth/ssodh/init") in {(r[1], r[2]) for r in gw.request_log}
        assert gw.authenticated
        assert not gw.competing
        assert named(logs, "session_unauthenticated")[0]["reason"] == detail


async def test_positions_refresh_subscribes_new_and_unsubscribes_closed(logs: Logs) -> None:
    m = market()
    async with gateway(m) as gw, running(gw, positions_refresh_s=0.2) as h:
        await streaming(h)
        book = m.positions("ibkr")
        closed = next(p for p in book if p.contract.asset_class == "OPT")
        held = {p.contract.key for p in book}
        new = next(c for c in m.option_contracts() if c.key not in held and c.underlying == "SPY")
        m.set_positions(
            "ibkr", [p for p in book if p is not closed] + [SimPosition("ibkr", "U1234567", new, 3.0, 2.0)]
        )

        def changed() -> bool:
            last = h.collector.snapshots()[-1]
            keys = {p.instrument for p in last.positions}
            return new.key in keys and closed.contract.key not in keys and bool(h.collector.updates(new.key))

        await h.wait_for(changed)
        expected = h.expected_conids()
        await gw.wait_for(lambda: gw.subscribed_conids() == expected)
        assert closed.contract.conid not in expected
        assert gw.umd_requests == {closed.contract.conid: 1}
        assert gw.smd_requests[new.conid] == 1
        assert len(h.collector.sessions()) == 1  # no reconnect
        changes = named(logs, "subscriptions_changed")
        assert changes[0]["subscribed"] == 1
        assert changes[0]["unsubscribed"] == 1


@pytest.mark.parametrize(
    "options", [{"binary_frames": True}, {"stray_bytes": True}, {"duplicate_first_frame": True}]
)
async def test_binary_frames_stray_bytes_and_repeated_first_frames(options: dict[str, Any]) -> None:
    m = market()
    async with gateway(m, **options) as gw, running(gw) as h:
        await streaming(h)
        await h.wait_for(lambda: len(h.collector.updates()) > 3 * len(h.expected_conids()))
        assert h.info()["malformed_total"] == 0
        seen = [(u.instrument, u.seq) for u in h.collector.updates()]
        assert len(seen) == len(set(seen))  # every update once per (instrument, seq)


async def test_greeks_that_arrive_late_are_absent_until_then() -> None:
    m = market()
    async with gateway(m, greeks_delay_s=0.3) as gw, running(gw) as h:
        key = h.options()[0].contract.key
        await h.wait_for(lambda: any("delta" in u.values for u in h.collector.updates(key)))
        first = h.collector.updates(key)[0]
        assert "delta" not in first.values  # absent, not zero, not None
        assert "bid" in first.values


async def test_120_positions_over_two_pages() -> None:
    m = market(positions=120)
    assert len(m.positions("ibkr")) == 120
    async with gateway(m) as gw, running(gw, max_subscriptions=200) as h:
        await streaming(h)
        (snapshot,) = h.collector.snapshots()
        assert len(snapshot.positions) == 120
        pages = [r[2] for r in gw.request_log if "/positions/" in r[2]]
        assert pages == ["/v1/api/portfolio/U1234567/positions/0", "/v1/api/portfolio/U1234567/positions/1"]
        assert gw.subscribed_conids() == h.expected_conids()


async def test_more_conids_than_market_data_lines(logs: Logs) -> None:
    m = market()
    async with gateway(m) as gw, running(gw, max_subscriptions=10) as h:
        await h.wait_for(lambda: h.collector.sessions())
        await gw.wait_for(lambda: len(gw.subscribed_conids()) == 10)
        options = {p.contract.conid for p in h.options()}
        assert gw.subscribed_conids() <= options  # options first
        left_out = len(h.expected_conids()) - 10
        await h.wait_for(lambda: h.info()["subscriptions_left_out"] == left_out)
        (warning,) = named(logs, "subscriptions_over_limit")
        assert (warning["limit"], warning["left_out"]) == (10, left_out)
        assert warning["log_level"] == "warning"


async def test_subscription_error_answers_are_counted_not_fatal(logs: Logs) -> None:
    m = market()
    rejected = next(p.contract for p in m.positions("ibkr") if p.contract.asset_class == "OPT")
    async with gateway(m, reject_conids=frozenset({rejected.conid})) as gw, running(gw) as h:
        await h.wait_for(lambda: h.info().get("errors_total") == 1)
        others = h.option_keys() - {rejected.key}
        await h.wait_for(lambda: others <= h.collector.keys())
        assert h.info()["restarts"] == 0
        assert named(logs, "subscription_error")[0]["conid"] == rejected.conid


async def test_rest_pacing_and_429_retry_after(logs: Logs) -> None:
    m = market(ibkr_accounts=tuple(f"U{i:07d}" for i in range(1, 13)))
    async with gateway(m) as gw:
        gw.faults.inject(Fault.RATE_LIMITED, count=1)
        async with running(gw) as h:
            await streaming(h)
            (limited,) = named(logs, "rest_rate_limited")
            assert limited["retry_after_s"] == 1.0
            log = gw.request_log
            assert log[0][3] == 429
            assert log[1][2] == log[0][2]  # the same request again...
            assert log[1][0] - log[0][0] >= 0.99  # ...after Retry-After
            times = sorted(r[0] for r in log)
            assert len(times) > 10
            for i, t in enumerate(times):  # at most 10 requests in any second
                assert len([u for u in times[i:] if u < t + 0.95]) <= 10


def tls_gateway_context(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "gateway-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server, ca_file


async def test_tls_verified_with_the_ca_file(tmp_path: Path, logs: Logs) -> None:
    server, ca_file = tls_gateway_context(tmp_path)
    async with gateway(market(), ssl_context=server) as gw, running(gw, ca_file=ca_file) as h:
        assert gw.base_url.startswith("https://")
        await streaming(h)
        assert named(logs, "tls_verification_disabled") == []
        assert named(logs, "tls_verification_failed") == []


@contextmanager
def handshakes_refused_by_the_client() -> Iterator[None]:
    """The simulator's side of a refused TLS handshake: the client hangs up mid-handshake, which
    asyncio reports to the loop's exception handler in debug mode (PYTHONASYNCIODEBUG=1). That is
    the expected outcome here, not an error of the test."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), ConnectionResetError | ssl.SSLError):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)


async def test_tls_refused_without_the_ca_file_with_one_line_naming_the_settings(
    tmp_path: Path, logs: Logs
) -> None:
    server, _ = tls_gateway_context(tmp_path)
    with handshakes_refused_by_the_client():
        await _refused(server, logs)


async def _refused(server: ssl.SSLContext, logs: Logs) -> None:
    async with gateway(market(), ssl_context=server) as gw, running(gw) as h:
        await h.wait_for(lambda: h.info()["restarts"] >= 2)
        failures = named(logs, "tls_verification_failed")
        assert len(failures) >= 2  # one line per attempt
        assert "IBKR_CA_FILE" in failures[0]["detail"]
        assert "IBKR_VERIFY_TLS=false" in failures[0]["detail"]
        assert h.collector.sessions() == []
        assert gw.stats["connections"] == 0


async def test_tls_opt_out_is_allowed_and_logged_at_every_connect(tmp_path: Path, logs: Logs) -> None:
    server, _ = tls_gateway_context(tmp_path)
    async with gateway(market(), ssl_context=server) as gw, running(gw, verify_tls=False) as h:
        await streaming(h)
        gw.faults.inject(Fault.DROP, count=1)
        await streaming(h, after=time.time(), sessions=2)
        warnings = named(logs, "tls_verification_disabled")
        assert len(warnings) == 2
        assert warnings[0]["setting"] == "IBKR_VERIFY_TLS=false"


async def test_session_message_when_the_server_waits_for_one(logs: Logs) -> None:
    async with gateway(market(), session_message_required=True) as gw, running(gw) as h:
        await streaming(h)
        assert named(logs, "ws_session_requested")[0]["answered"] is True


@pytest.mark.parametrize("form", ["plain", "json"])
async def test_known_session_cookie_in_either_form(form: str, logs: Logs) -> None:
    sid = "d21b8cf5ebc8ea01c6ce37c8125ec83f"
    cookie = sid if form == "plain" else '{"session":"' + sid + '"}'
    async with gateway(market(), session_id=sid) as gw, running(gw, session_cookie=Secret(cookie)) as h:
        await streaming(h)
    assert sid not in repr(logs)


async def test_a_rejected_session_cookie_is_transient_and_never_logged(logs: Logs) -> None:
    secret = "0123456789abcdef0123456789abcdef"
    async with gateway(market()) as gw, running(gw, session_cookie=Secret(secret)) as h:
        await h.wait_for(lambda: h.info()["restarts"] >= 1)
        assert "HTTP 401" in (h.registry.actors["ibkr"].last_error or "")
    assert secret not in repr(logs)


async def test_positions_lacking_details_are_completed_by_secdef() -> None:
    m = market()
    async with gateway(m, sparse_positions=True) as gw, running(gw) as h:
        await streaming(h)
        (snapshot,) = h.collector.snapshots()
        assert sorted(p.instrument for p in snapshot.positions) == sorted(
            p.contract.key for p in m.positions("ibkr")
        )
        assert any(r[2] == "/v1/api/trsrv/secdef" for r in gw.request_log)


async def test_malformed_frames_are_counted_and_the_stream_goes_on(logs: Logs) -> None:
    m = market()
    async with gateway(m) as gw, running(gw) as h:
        await streaming(h)
        gw.faults.inject(Fault.MALFORMED, count=3)
        gw.faults.inject(Fault.TRUNCATED, count=2)
        gw.faults.inject(Fault.UNKNOWN_MESSAGE, count=2)
        await h.wait_for(lambda: h.info()["malformed_total"] == 5)
        await streaming(h, after=time.time())
        assert h.info()["restarts"] == 0
        malformed = named(logs, "frame_malformed")
        assert len(malformed) == 5
        assert all(len(e["frame"]) <= 200 for e in malformed)
        assert len(named(logs, "unknown_message")) == 1  # once per topic


async def test_an_account_the_gateway_does_not_report_is_fatal() -> None:
    async with gateway(market()) as gw, running(gw, accounts=("U9999999",)) as h:
        await h.wait_for(lambda: h.supervisor.fatal_error is not None)
        assert "IBKR_ACCOUNTS" in str(h.supervisor.fatal_error)
        assert "U9999999" in str(h.supervisor.fatal_error)

"""Demo feeds: canonical rows straight from the simulated market, without a wire protocol.

They stand in for the IBKR and Tastytrade actors until those land, so that ``python run.py`` runs
the whole tree (feeds -> normalizer -> writer -> PostgreSQL) on a fresh machine. The rows come
from the seeded market model of :mod:`simulator.market` (Black-Scholes-Merton Greeks on a GBM
path); logs and the status file say the data is simulated.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from normalize.model import GreeksSnapshot, position_exposure
from simulator.market import Market, SimPosition, Tick
from supervisor.context import ActorContext
from supervisor.spec import RunFn


def tick_to_row(position: SimPosition, tick: Tick, received_ts: float) -> GreeksSnapshot:
    """A simulator position and tick as one canonical row (units are already canonical)."""
    c = position.contract
    qty = position.quantity
    mult = c.multiplier
    return GreeksSnapshot(
        broker=position.broker,
        account=position.account,
        instrument=c.key,
        underlying=c.underlying,
        asset_class=c.asset_class,
        right=c.right,
        strike=c.strike,
        expiry=c.expiry,
        multiplier=mult,
        quantity=qty,
        event_ts=tick.ts,
        received_ts=received_ts,
        bid=tick.bid,
        ask=tick.ask,
        last=tick.last,
        mark=tick.mark,
        underlying_price=tick.underlying_price,
        iv=tick.iv,
        delta=tick.delta,
        gamma=tick.gamma,
        theta=tick.theta,
        vega=tick.vega,
        rho=tick.rho,
        pos_delta=position_exposure(tick.delta, qty, mult),
        pos_gamma=position_exposure(tick.gamma, qty, mult),
        pos_theta=position_exposure(tick.theta, qty, mult),
        pos_vega=position_exposure(tick.vega, qty, mult),
        seq=tick.seq,
    )


def make_demo_feed(
    broker: str, market: Market, rate_hz: float, *, clock: Callable[[], float] = time.time
) -> RunFn:
    """A source actor: every ``1/rate_hz`` s one batch with a fresh row for each position."""

    async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        positions = market.positions(broker)
        out = ctx.senders["raw"]
        ctx.log.info("demo_feed_started", broker=broker, positions=len(positions), simulated=True)
        task_status.started()
        period = 1.0 / rate_hz
        with out:
            while True:
                now = clock()
                batch = [tick_to_row(p, market.tick(broker, p.contract.key, now), now) for p in positions]
                await out.send(batch)
                ctx.record_events(len(batch))
                await anyio.sleep(period)

    return run

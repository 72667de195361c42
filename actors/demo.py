"""Demo feeds: broker-neutral events straight from the simulated market, without a wire protocol.

They stand in for the IBKR and Tastytrade actors until those land, so that ``python run.py`` runs
the whole tree (feeds -> normalizer -> writer -> PostgreSQL) on a fresh machine. A feed sends its
book as a :class:`~normalize.events.PositionsSnapshot`, then every ``1/rate_hz`` s one batch of
:class:`~normalize.events.InstrumentUpdate` (every field, canonical units) for each contract it
holds and each underlying. The values come from the seeded market model of
:mod:`simulator.market`; logs and the status file say the data is simulated.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from normalize.events import BrokerEvent, InstrumentUpdate, PositionsSnapshot
from normalize.model import AssetClass, Right, UnifiedPosition
from simulator.market import Market, SimPosition, Tick
from supervisor.context import ActorContext
from supervisor.spec import RunFn


def to_position(p: SimPosition) -> UnifiedPosition:
    c = p.contract
    return UnifiedPosition(
        broker=p.broker,
        account=p.account,
        instrument=c.key,
        underlying=c.underlying,
        asset_class=AssetClass.OPTION if c.asset_class == "OPT" else AssetClass.STOCK,
        right=None if c.right is None else Right(c.right),
        strike=c.strike,
        expiry=c.expiry,
        multiplier=c.multiplier,
        quantity=p.quantity,
        avg_cost=p.avg_cost,
    )


def tick_to_update(broker: str, tick: Tick, received_ts: float) -> InstrumentUpdate:
    """A simulator tick as one full instrument update (units are already canonical)."""
    return InstrumentUpdate(
        broker,
        tick.key,
        tick.ts,
        received_ts,
        tick.seq,
        {
            "bid": tick.bid,
            "ask": tick.ask,
            "last": tick.last,
            "mark": tick.mark,
            "underlying_price": tick.underlying_price,
            "iv": tick.iv,
            "delta": tick.delta,
            "gamma": tick.gamma,
            "theta": tick.theta,
            "vega": tick.vega,
            "rho": tick.rho,
        },
    )


def make_demo_feed(
    broker: str, market: Market, rate_hz: float, *, clock: Callable[[], float] = time.time
) -> RunFn:
    """A source actor: its positions once, then every ``1/rate_hz`` s one batch of updates."""

    async def run(ctx: ActorContext, task_status: TaskStatus[None]) -> None:
        positions = market.positions(broker)
        keys = list(dict.fromkeys(p.contract.key for p in positions))
        out = ctx.senders["raw"]
        ctx.log.info("demo_feed_started", broker=broker, positions=len(positions), simulated=True)
        snapshot = PositionsSnapshot(
            broker, tuple(market.accounts(broker)), tuple(map(to_position, positions)), clock()
        )
        task_status.started()
        period = 1.0 / rate_hz
        with out:
            await out.send([snapshot])
            while True:
                now = clock()
                batch: list[BrokerEvent] = [
                    tick_to_update(broker, market.tick(broker, k, now), now) for k in keys
                ]
                await out.send(batch)
                ctx.record_events(len(batch))
                await anyio.sleep(period)

    return run

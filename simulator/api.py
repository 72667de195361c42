"""In-process API: start the simulators on a shared market, for tests, benchmarks and ``run.py``.

```python
async with run_simulators(MarketConfig(seed=7), brokers=("ibkr",)) as sims:
    sims.ibkr.rest_url, sims.ibkr.ws_url          # http://127.0.0.1:PORT/v1/api, ws://.../v1/api/ws
    sims.tastytrade.api_url, sims.tastytrade.dxlink_url
    sims.ibkr.faults.inject(Fault.DROP, count=1)  # faults are per simulator
    sims.market.ledger("ibkr")                    # (broker, key) -> last seq emitted
```
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from simulator.ibkr import IbkrGateway
from simulator.market import Market, MarketConfig

if TYPE_CHECKING:
    from simulator.tastytrade import TastytradeSim

BROKER_NAMES = ("ibkr", "tastytrade")


@dataclass
class Simulators:
    market: Market
    ibkr: IbkrGateway | None = None
    tastytrade: TastytradeSim | None = None

    def ledger(self, broker: str | None = None) -> dict[tuple[str, str], int]:
        """``(broker, key) -> last seq emitted`` (see :meth:`Market.ledger`)."""
        return self.market.ledger(broker)

    def urls(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.ibkr is not None:
            out["ibkr_rest"] = self.ibkr.rest_url
            out["ibkr_ws"] = self.ibkr.ws_url
        if self.tastytrade is not None:
            out["tastytrade_api"] = self.tastytrade.api_url
            out["tastytrade_dxlink"] = self.tastytrade.dxlink_url
        return out


@asynccontextmanager
async def run_simulators(
    config: MarketConfig,
    *,
    brokers: Sequence[str] = BROKER_NAMES,
    host: str = "127.0.0.1",
    ibkr_port: int = 0,
    tastytrade_port: int = 0,
    start_ts: float | None = None,
    market: Market | None = None,
    ibkr_options: Mapping[str, Any] | None = None,
    tastytrade_options: Mapping[str, Any] | None = None,
) -> AsyncIterator[Simulators]:
    """Start the requested simulators over one :class:`Market`; stop them on exit.

    Args:
        config: the market and books.
        brokers: any of ``"ibkr"``, ``"tastytrade"``.
        host: interface to bind (loopback by default).
        ibkr_port: the gateway's port (REST and WebSocket), 0 for any free port.
        tastytrade_port: the Tastytrade REST port, 0 for any free port.
        start_ts: the market's start time (default: now).
        market: use this market instead of building one from ``config``.
        ibkr_options: keyword options for :class:`~simulator.ibkr.IbkrGateway`
            (see :class:`~simulator.ibkr.IbkrOptions`).
        tastytrade_options: keyword options for ``TastytradeSim``.

    Raises:
        ValueError: an unknown broker name.
    """
    unknown = [b for b in brokers if b not in BROKER_NAMES]
    if unknown:
        raise ValueError(f"unknown broker(s): {', '.join(unknown)}")
    shared = market or Market(config, time.time() if start_ts is None else start_ts)
    sims = Simulators(market=shared)
    async with AsyncExitStack() as stack:
        if "ibkr" in brokers:
            gateway = IbkrGateway(shared, host=host, port=ibkr_port, **dict(ibkr_options or {}))
            await gateway.start()
            stack.push_async_callback(gateway.stop)
            sims.ibkr = gateway
        if "tastytrade" in brokers:
            from simulator.tastytrade import TastytradeSim  # imported lazily: optional part

            tasty = TastytradeSim(shared, host=host, port=tastytrade_port, **dict(tastytrade_options or {}))
            await tasty.start()
            stack.push_async_callback(tasty.stop)
            sims.tastytrade = tasty
        yield sims

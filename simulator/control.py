"""A control plane for simulators running in their own process (chaos tests, benchmarks).

``python -m simulator both --control-port N`` serves, on 127.0.0.1:N (JSON bodies):

- ``GET /ledger``: ``{"seq_offset": n, "brokers": {broker: {key: last_seq}}, "emissions":
  {broker: {key: [t1, t2, ...]}}}``; ``emissions`` (the POSIX time of every seq, in order) only
  when the simulator records them (``--record-times``).
- ``POST /faults/{broker}``: ``{"fault": "stall", "duration_s": 5, "count": null}`` injects a
  :class:`~simulator.faults.Fault` into that broker's simulator; ``{"fault": null}`` or
  ``POST /faults/{broker}/clear`` clears (one fault, or all).
- ``GET /stats``: per broker, connected clients and simulator counters.

It never listens on anything but loopback: it is a test tool, not an API.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from simulator.api import Simulators
from simulator.faults import Fault


def _sim(sims: Simulators, broker: str) -> Any:
    sim = getattr(sims, broker, None) if broker in ("ibkr", "tastytrade") else None
    if sim is None:
        raise web.HTTPNotFound(text=f"no {broker} simulator here")
    return sim


def build_app(sims: Simulators) -> web.Application:
    async def ledger(_request: web.Request) -> web.Response:
        brokers: dict[str, dict[str, int]] = {}
        for (broker, key), seq in sims.ledger().items():
            brokers.setdefault(broker, {})[key] = seq
        emissions: dict[str, dict[str, list[float]]] = {}
        for (broker, key), times in sims.market.emissions().items():
            emissions.setdefault(broker, {})[key] = times
        body = {"seq_offset": sims.market.config.seq_offset, "brokers": brokers, "emissions": emissions}
        return web.json_response(body)

    async def inject(request: web.Request) -> web.Response:
        sim = _sim(sims, request.match_info["broker"])
        body = await request.json()
        name = body.get("fault")
        if name is None:
            sim.faults.clear()
            return web.json_response({"cleared": "all"})
        try:
            fault = Fault(name)
            sim.faults.inject(
                fault, duration_s=body.get("duration_s"), count=body.get("count"), now=time.time()
            )
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response({"injected": fault.value})

    async def clear(request: web.Request) -> web.Response:
        sim = _sim(sims, request.match_info["broker"])
        body = await request.json() if request.can_read_body else {}
        name = body.get("fault")
        sim.faults.clear(None if name is None else Fault(name))
        return web.json_response({"cleared": name or "all"})

    async def stats(_request: web.Request) -> web.Response:
        out: dict[str, Any] = {}
        if sims.ibkr is not None:
            out["ibkr"] = {"clients": sims.ibkr.client_count, **sims.ibkr.stats}
        if sims.tastytrade is not None:
            out["tastytrade"] = {"clients": len(sims.tastytrade.connections)}
        return web.json_response(out)

    app = web.Application()
    app.router.add_get("/ledger", ledger)
    app.router.add_post("/faults/{broker}", inject)
    app.router.add_post("/faults/{broker}/clear", clear)
    app.router.add_get("/stats", stats)
    return app


async def start_control(sims: Simulators, port: int) -> web.AppRunner:
    """Serve the control plane on 127.0.0.1:``port`` (0: any); ``runner.addresses`` tells where."""
    runner = web.AppRunner(build_app(sims), handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner

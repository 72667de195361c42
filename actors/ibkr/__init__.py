"""Interactive Brokers: the Client Portal Web API session and its WebSocket stream of option
market data and Greeks.

- :mod:`actors.ibkr.protocol`: the pure WebSocket codec and connection state machine
  (:class:`~actors.ibkr.protocol.IbkrProtocol`), and the subscription plan.
- :mod:`actors.ibkr.rest`: the gateway's REST calls through aiohttp (session start-up,
  paginated positions, secdef), paced at 10 requests/s with 429 backoff.
- :mod:`actors.ibkr.actor`: :func:`make_ibkr_actor`, the thin loop that ties them together and puts
  broker-neutral events (mapped by :mod:`normalize.ibkr`) on the ``raw`` channel.

Wire facts: ``reference/ibkr-cp-websocket.md``. The same layout exists for Tastytrade in
:mod:`actors.tastytrade`.
"""

from actors.ibkr.actor import make_ibkr_actor

__all__ = ["make_ibkr_actor"]

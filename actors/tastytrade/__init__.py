"""The Tastytrade actor: REST through the ``tastytrade`` SDK, market data over DXLink.

- :mod:`actors.tastytrade.rest`: the SDK ``Session`` (OAuth refresh token), accounts, positions,
  streamer symbols and API quote tokens.
- :mod:`actors.tastytrade.protocol`: the pure DXLink client codec (text in, typed events out).
- :mod:`actors.tastytrade.actor`: :func:`make_tastytrade_actor`, the thin loop on ``websockets``
  that puts broker-neutral events (mapped by :mod:`normalize.tastytrade`) on the ``raw`` channel.

``make_tastytrade_actor`` is imported lazily, so the pure codec can be imported without the SDK
and ``websockets``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.tastytrade.actor import make_tastytrade_actor

__all__ = ["make_tastytrade_actor"]


def __getattr__(name: str) -> Any:
    if name == "make_tastytrade_actor":
        from actors.tastytrade.actor import make_tastytrade_actor

        return make_tastytrade_actor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

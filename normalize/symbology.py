"""Canonical instrument keys and the brokers' symbols for them, both ways.

Rules: pure. No I/O, no clock. Every function is total on its documented input and raises
``ValueError`` (never anything else) on a symbol it cannot read.

The canonical key (the ``instrument`` column, the same at every broker):

- **Equity and index options**: the OCC symbol. The option *root* (``SPY``, ``SPXW``) right-padded
  with spaces to 6 characters, the expiry as ``YYMMDD``, ``C`` or ``P``, and the strike times 1000
  as 8 digits: ``SPY   250117C00500000``, ``SPXW  240119P04712500``. The root is the OCC root, not
  the underlying: SPX weeklies are ``SPXW`` on the underlying ``SPX``.
- **Stocks, ETFs and indexes**: the ticker (``SPY``, ``SPX``).
- **Futures**: ``/`` + product + ``:`` + contract month ``YYYYMM``: ``/ES:202412``.
- **Futures options**: ``./`` + product + ``:`` + the future's ``YYYYMM`` + a space + the option
  root + a space + ``YYMMDD`` + ``C``/``P`` + the strike as written by :func:`format_strike`:
  ``./ES:202409 EW4 240823C5750``. Brokers name futures options very differently (IBKR by
  conid and trading class, DXLink ``./EW4Q24C5750:XCME``), so this form keeps every part needed to
  tell two contracts apart and nothing exchange-specific.

Broker forms handled here:

- DXLink streamer symbols of equity/index options: ``.`` + root + ``YYMMDD`` + ``C``/``P`` +
  strike without trailing zeros (``.SPY250117C500``, ``.SPXW240119P4712.5``, ``.SPY250117C500.25``).
  :func:`occ_to_streamer` agrees with the tastytrade SDK's ``Option.occ_to_streamer_symbol``;
  :func:`streamer_to_occ` also reads two- and three-decimal strikes (the SDK's reverse conversion
  gets those wrong) and roots with digits (adjusted options such as ``AAPL1``).
- IBKR ``contractDesc`` strings, which carry the OCC symbol in brackets for options:
  ``SPY    JAN2025 440 C [SPY   250117C00440000 100]`` (:func:`occ_from_ibkr_description`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

OCC_LENGTH = 21
MAX_STRIKE = 99_999.999  # 8 digits of strike x 1000

_OCC = re.compile(r"^([A-Z0-9]{1,6}) *(\d{6})([CP])(\d{8})$")
_STREAMER = re.compile(r"^\.([A-Z0-9]{1,6}?)(\d{6})([CP])(\d{1,5}(?:\.\d{1,3})?)$")
_BRACKET = re.compile(r"\[([A-Z0-9]{1,6} *\d{6}[CP]\d{8})(?:\s+[\d.]+)?\]")
_FUTURE = re.compile(r"^/([A-Z0-9]{1,6}):(\d{6})$")
_FUTURE_OPTION = re.compile(r"^\./([A-Z0-9]{1,6}):(\d{6}) ([A-Z0-9]{1,8}) (\d{6})([CP])(\d+(?:\.\d{1,3})?)$")


@dataclass(frozen=True, slots=True)
class OptionSymbol:
    """The parts of an equity/index option's OCC symbol."""

    root: str
    expiry: date
    right: str  # "C" or "P"
    strike: float


def format_strike(strike: float) -> str:
    """``500.0`` -> ``"500"``, ``4712.5`` -> ``"4712.5"``, ``500.25`` -> ``"500.25"`` (at most 3 decimals)."""
    return f"{strike:.3f}".rstrip("0").rstrip(".")


def _check_strike(strike: float) -> int:
    milli = round(strike * 1000)
    if not 0 < milli <= round(MAX_STRIKE * 1000) or abs(milli - strike * 1000) > 1e-6 * max(1.0, strike):
        raise ValueError(f"strike {strike!r} cannot be written in an OCC symbol")
    return milli


def _check_root(root: str) -> str:
    root = root.strip().upper()
    if not re.fullmatch(r"[A-Z0-9]{1,6}", root):
        raise ValueError(f"option root {root!r} is not 1 to 6 letters or digits")
    return root


def occ_symbol(root: str, expiry: date, right: str, strike: float) -> str:
    """The 21-character OCC symbol: ``occ_symbol("SPXW", date(2024, 1, 19), "P", 4712.5)`` ->
    ``"SPXW  240119P04712500"``."""
    right = right.upper()
    if right not in ("C", "P"):
        raise ValueError(f"right {right!r} is neither C nor P")
    return f"{_check_root(root):<6}{expiry:%y%m%d}{right}{_check_strike(strike):08d}"


def parse_occ(key: str) -> OptionSymbol:
    """An OCC symbol's parts; ``ValueError`` when ``key`` is not one. Accepts the padded form and the
    unpadded one some APIs print (``SPY250117C00500000``)."""
    m = _OCC.match(key.strip() if len(key) != OCC_LENGTH else key)
    if m is None:
        raise ValueError(f"{key!r} is not an OCC option symbol")
    root, ymd, right, milli = m.groups()
    return OptionSymbol(root, _yymmdd(ymd), right, int(milli) / 1000)


def is_option_key(key: str) -> bool:
    try:
        parse_occ(key)
    except ValueError:
        return False
    return True


def occ_to_streamer(key: str) -> str:
    """OCC symbol -> DXLink streamer symbol: ``"SPXW  240119P04712500"`` -> ``".SPXW240119P4712.5"``."""
    o = parse_occ(key)
    return f".{o.root}{o.expiry:%y%m%d}{o.right}{format_strike(o.strike)}"


def streamer_symbol(root: str, expiry: date, right: str, strike: float) -> str:
    """The DXLink symbol of an equity/index option from its parts: ``.SPXW250117P5812.5``."""
    return occ_to_streamer(occ_symbol(root, expiry, right, strike))


def streamer_to_occ(symbol: str) -> str:
    """DXLink streamer symbol -> OCC symbol: ``".SPY250117C500.25"`` -> ``"SPY   250117C00500250"``."""
    m = _STREAMER.match(symbol)
    if m is None:
        raise ValueError(f"{symbol!r} is not a DXLink equity option symbol")
    root, ymd, right, strike = m.groups()
    return occ_symbol(root, _yymmdd(ymd), right, float(strike))


def occ_from_ibkr_description(description: str) -> str | None:
    """The OCC symbol inside an IBKR ``contractDesc`` (``"... [SPY   250117C00440000 100]"``),
    or ``None`` when it carries none (stocks, some option rows)."""
    m = _BRACKET.search(description)
    if m is None:
        return None
    inner = m.group(1)
    # The bracket sometimes collapses the padding; rebuild the canonical form from the parts.
    o = parse_occ(inner)
    return occ_symbol(o.root, o.expiry, o.right, o.strike)


def future_key(product: str, contract_month: str) -> str:
    """``future_key("ES", "202412")`` -> ``"/ES:202412"`` (``contract_month`` as YYYYMM)."""
    product = product.strip().upper().lstrip("/")
    key = f"/{product}:{contract_month}"
    if _FUTURE.match(key) is None or not 1 <= int(contract_month[4:]) <= 12:
        raise ValueError(f"cannot build a futures key from {product!r}, {contract_month!r}")
    return key


def future_option_key(
    product: str, contract_month: str, option_root: str, expiry: date, right: str, strike: float
) -> str:
    """``future_option_key("ES", "202409", "EW4", date(2024, 8, 23), "C", 5750)`` ->
    ``"./ES:202409 EW4 240823C5750"``."""
    base = future_key(product, contract_month)
    right = right.upper()
    if right not in ("C", "P") or not strike > 0:
        raise ValueError(f"bad right or strike: {right!r}, {strike!r}")
    root = option_root.strip().upper()
    key = f".{base} {root} {expiry:%y%m%d}{right}{format_strike(strike)}"
    if _FUTURE_OPTION.match(key) is None:
        raise ValueError(f"cannot build a futures option key from {option_root!r}")
    return key


def _yymmdd(text: str) -> date:
    try:
        return date(2000 + int(text[:2]), int(text[2:4]), int(text[4:6]))
    except ValueError:
        raise ValueError(f"{text!r} is not a YYMMDD date") from None

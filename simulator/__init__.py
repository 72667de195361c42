"""Local broker simulators speaking the real wire protocols.

- :mod:`simulator.market`: the shared, seeded market model (GBM paths, BSM prices and Greeks,
  per-broker books, the emitted-update ledger).
- :mod:`simulator.schedule`: per-contract update times (rate and burstiness).
- :mod:`simulator.faults`: run-time fault switches.
- :mod:`simulator.ibkr`: the IBKR Client Portal gateway (REST + ``/v1/api/ws``).
- :mod:`simulator.tastytrade`: Tastytrade REST + DXLink.
- :mod:`simulator.api`: :func:`run_simulators`, the in-process entry point.
- ``python -m simulator ibkr|tastytrade|both``: standalone servers.
"""

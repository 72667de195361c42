"""``python -m bench.peers NAME --ready-file F --dsn DSN [--stats-file S]``: run one peer."""

from __future__ import annotations

import sys

from bench.peers import PEERS, peer
from bench.peers._common import run


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in PEERS:
        print(f"usage: python -m bench.peers {{{','.join(PEERS)}}} --ready-file F --dsn DSN", file=sys.stderr)
        return 2
    entry, _sql, _brokers = peer(argv[0])
    return run(entry, argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

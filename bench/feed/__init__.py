"""The benchmark feed: both brokers' wire protocols at a target rate, in a process of its own.

``python -m bench.feed --rate R --mix both --ready-file F`` (see :mod:`bench.feed.__main__`);
the servers are in :mod:`bench.feed.server`, the pre-built frames in :mod:`bench.feed.templates`.
"""

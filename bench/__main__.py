"""One entry point for every benchmark: ``python -m bench NAME [ARGS...]``.

``NAME`` is a module of this package with a ``cli(argv)`` function (``bench/writer.py`` ->
``python -m bench writer --seconds 5``). Each benchmark prints a table and writes JSON (``--out
FILE.json``) and a PNG under ``bench/out/``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(
        m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_") and not m.ispkg
    )


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks: " + ", ".join(names))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"unknown benchmark {name!r}; one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    sys.argv = [f"python -m bench {name}", *rest]
    result = module.cli(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

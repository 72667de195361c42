#!/usr/bin/env python3
"""Set-up and entry points that need nothing but Python 3.11+.

    python3 dev.py run [ARGS...]    create .venv and install if needed, then `python run.py ARGS...`
    python3 dev.py test [ARGS...]   create .venv and install dev extras if needed, then `pytest ARGS...`
    python3 dev.py lint             ruff check, ruff format --check, mypy on the pure modules
    python3 dev.py bench NAME       python -m bench NAME

The virtual environment lives in .venv (override with VENV). Installation is redone only when
pyproject.toml changes (a hash stamp inside the venv).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("VENV", ROOT / ".venv"))
PY = VENV / "bin" / "python"


def ensure_venv(extras: str) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"Python 3.11 or newer is needed (this is {sys.version.split()[0]})")
    if not PY.exists():
        print(f"dev.py: creating {VENV}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    # The C fast paths are built by the install: a changed C source reinstalls too.
    sources = [ROOT / "pyproject.toml", *sorted(ROOT.glob("*/_speedups.c"))]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + extras.encode()).hexdigest()
    stamp = VENV / f".installed-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"dev.py: installing streaming-greeks{extras} into {VENV}", file=sys.stderr)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}{extras}"], check=True, cwd=ROOT)
    stamp.write_text(digest)


def run(cmd: list[str]) -> int:
    return subprocess.call(cmd, cwd=ROOT)


def exec_in_venv(args: list[str]) -> int:
    """Replace this process, so that SIGINT/SIGTERM reach the engine itself (and its drain)."""
    os.chdir(ROOT)
    os.execv(str(PY), [str(PY), *args])
    return 0  # pragma: no cover - execv does not return


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        ensure_venv("")
        return exec_in_venv(["run.py", *rest])
    if command == "test":
        ensure_venv("[dev]")
        return exec_in_venv(["-m", "pytest", *rest])
    if command == "lint":
        ensure_venv("[dev]")
        bin_dir = VENV / "bin"
        return (
            run([str(bin_dir / "ruff"), "check", "."])
            or run([str(bin_dir / "ruff"), "format", "--check", "."])
            or run([str(bin_dir / "mypy")])
        )
    if command == "bench":
        ensure_venv("[dev]")
        if not rest:
            print("usage: python3 dev.py bench NAME [ARGS...]", file=sys.stderr)
            return 2
        return run([str(PY), "-m", "bench", *rest])
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Fetch timm's own model tests (``tests/test_models.py``) for the installed timm.

The file comes from timm's source distribution on PyPI, for exactly the timm version
this interpreter imports, and is kept in ``.cache/timm-tests/<version>/`` (ignored by
git); a second call reuses it. Prints the file's path. On failure: exit status 1 and
one line saying why (no network, no such sdist, file missing from it).

    python scripts/fetch_timm_tests.py        # -> .cache/timm-tests/1.0.31/test_models.py
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "timm-tests"
MEMBER = "tests/test_models.py"


class FetchError(RuntimeError):
    pass


def cached_path(timm_version: str) -> Path:
    return CACHE / timm_version / "test_models.py"


def _download_sdist(timm_version: str, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(folder), f"timm=={timm_version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download of the timm {timm_version} sdist took over 300 s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["(no output)"]
        raise FetchError(f"pip download of the timm {timm_version} sdist failed: "
                         f"{errors[-1][:300]}")
    sdists = sorted(folder.glob("timm-*.tar.gz"))
    if not sdists:
        raise FetchError(f"pip download gave no timm sdist in {folder}: "
                         f"{sorted(p.name for p in folder.iterdir())}")
    return sdists[0]


def _extract(sdist: Path, timm_version: str, dest: Path) -> None:
    name = f"timm-{timm_version}/{MEMBER}"
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            member = tar.getmember(name)
        except KeyError:
            raise FetchError(f"{sdist.name} has no {name}") from None
        if not member.isfile():
            raise FetchError(f"{name} in {sdist.name} is not a regular file")
        data = tar.extractfile(member).read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)  # atomic: a concurrent run sees the old file or the whole new one
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    (dest.parent / "SOURCE").write_text(f"{sdist.name} sha256={digest}\n{name}\n")


def fetch(timm_version: str | None = None) -> Path:
    """Path of timm's test_models.py for ``timm_version`` (default: the installed timm)."""
    if timm_version is None:
        try:
            timm_version = version("timm")
        except PackageNotFoundError:
            raise FetchError("timm is not installed in this environment") from None
    dest = cached_path(timm_version)
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory(prefix="timm-sdist-") as tmp:
        _extract(_download_sdist(timm_version, Path(tmp)), timm_version, dest)
    return dest


def main() -> int:
    try:
        print(fetch(sys.argv[1] if len(sys.argv) > 1 else None))
    except FetchError as e:
        print(f"fetch_timm_tests: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

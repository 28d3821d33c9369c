"""Build the benchmark's input chains: base <- mid <- top, identical for both daemons.

- base: every cluster holds random data.
- mid: half of its 1 MiB extents (chosen at random, scattered) rewritten with random data.
- top: a few 1 MiB extents of random data.

How (the "random" method, the default): random bytes are written to a raw file and turned
into qcow2 with ``qemu-img convert``. For mid and top the raw file is sparse (data only in
the chosen extents), ``convert`` leaves the holes unallocated, and ``qemu-img rebase -u``
then points the image at its backing file without touching data. The "pattern" method
writes the same layout with ``qemu-io write -P`` (one fill byte per extent) instead;
``python -m benchmarks.chains --compare`` times both. Random bytes come from numpy's PCG64
when numpy is importable (about 1.4 GB/s here) and from ``random.Random`` otherwise
(about 200 MB/s); either way a seed gives the same bytes.

Backing file names are absolute, so a copy of top anywhere still finds mid. Each timed
run streams into a fresh copy of top (``cp --reflink=auto``); base and mid are only read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
EXTENT = MiB
TOP_EXTENTS = 4  # "a few"; fewer on tiny chains (at most 1 per 16 MiB, at least 1)
_BLOCK = 16 * MiB


def _run(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _random_source(seed: int) -> Callable[[int], bytes]:
    try:
        import numpy as np
    except ImportError:  # slower (about 200 MB/s), but the same seed still gives the same data
        return random.Random(seed).randbytes
    rng = np.random.default_rng(seed)
    return lambda n: bytes(rng.bytes(n))


@dataclass(frozen=True)
class Chain:
    """One built chain on disk (paths absolute) and what streaming it must copy.

    Attributes:
        base, mid, top: the qcow2 files; top's backing is mid, mid's is base.
        size: virtual size in bytes.
        copy_full: bytes a stream without base must copy (allocated below top).
        copy_to_base: bytes a stream with ``base-node`` = base must copy (allocated in mid
            and not in top).
        commit_mid: bytes a commit of mid into base copies (all mid stores).
        commit_active: bytes an active commit of top into base copies (all that top or
            mid stores).
    """

    base: Path
    mid: Path
    top: Path
    size: int
    copy_full: int
    copy_to_base: int
    commit_mid: int
    commit_active: int

    def fresh_top(self, dest: Path) -> Path:
        """Copy top to ``dest`` (reflink when the filesystem can) and return ``dest``."""
        _run(["cp", "--reflink=auto", str(self.top), str(dest)])
        return dest

    def empty_top(self, dest: Path) -> Path:
        """Create an empty overlay of mid at ``dest`` (every byte of a stream is copied)."""
        return empty_image(dest, self.size, backing=self.mid)

    def fresh_base(self, dest: Path) -> Path:
        """Copy base to ``dest`` (a commit writes into it) and return ``dest``."""
        _run(["cp", "--reflink=auto", str(self.base), str(dest)])
        return dest

    def files(self) -> tuple[Path, Path, Path]:
        return (self.base, self.mid, self.top)


def empty_image(dest: Path, size: int, *, backing: Path | None = None) -> Path:
    """Create an empty qcow2 image of ``size`` at ``dest`` (over ``backing``, if given)."""
    over = [] if backing is None else ["-b", str(backing), "-F", "qcow2"]
    _run(["qemu-img", "create", "-q", "-f", "qcow2", *over, str(dest), str(size)])
    return dest


def _extents_of(size: int, seed: int) -> tuple[list[int], list[int]]:
    """Pick mid's extents (half of all, scattered) and top's (a few), as offsets."""
    rng = random.Random(seed)
    n = size // EXTENT
    mid = sorted(rng.sample(range(n), n // 2))
    top = sorted(rng.sample(range(n), max(1, min(TOP_EXTENTS, n // 16))))
    return [i * EXTENT for i in mid], [i * EXTENT for i in top]


def _write_raw(
    path: Path, size: int, extents: Iterable[int] | None, gen: Callable[[int], bytes]
) -> None:
    """Write a raw file of ``size``: fully random (``extents`` None) or sparse with random
    data in the 1 MiB ``extents`` only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        if extents is None:
            for off in range(0, size, _BLOCK):
                n = min(_BLOCK, size - off)
                os.pwrite(fd, gen(n), off)
        else:
            for off in extents:
                os.pwrite(fd, gen(EXTENT), off)
    finally:
        os.close(fd)


def _random_base(path: Path, size: int, gen: Callable[[int], bytes]) -> None:
    """Fill every cluster of a new qcow2 with random bytes in one pass: create it with
    ``preallocation=metadata`` (all L2 entries point at host clusters that still read as
    zeros from the sparse file), then write the random bytes at those host offsets."""
    _run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            str(path),
            str(size),
        ]
    )
    mapping = json.loads(_run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)]))
    fd = os.open(path, os.O_WRONLY)
    try:
        for ext in mapping:
            if "offset" not in ext:
                raise RuntimeError(f"preallocated extent without a host offset: {ext}")
            host, length = int(ext["offset"]), int(ext["length"])
            for pos in range(0, length, _BLOCK):
                os.pwrite(fd, gen(min(_BLOCK, length - pos)), host + pos)
    finally:
        os.close(fd)


def _to_qcow2(raw: Path, out: Path, backing: Path | None) -> None:
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)])
    raw.unlink()
    if backing is not None:
        _run(
            ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(out)]
        )


def _qemu_io_writes(image: Path, extents: Iterable[tuple[int, int, int]]) -> None:
    cmds: list[str] = []
    for off, length, pattern in extents:
        cmds += ["-c", f"write -q -P {pattern} {off} {length}"]
    for i in range(0, len(cmds), 2000):  # keep each command line modest
        _run(["qemu-io", "-f", "qcow2", *cmds[i : i + 2000], str(image)])


def allocation(top: Path) -> tuple[int, int, int]:
    """Return (bytes allocated below top, bytes allocated in top's backing only, bytes
    allocated in top or its backing) from ``qemu-img map``: what a full stream, a stream
    to ``base-node`` = base and an active commit into base copy."""
    out = _run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(top)])
    full = to_base = above_base = 0
    for ext in json.loads(out):
        if not ext.get("data"):
            continue
        depth = int(ext.get("depth", 0))
        if depth >= 1:
            full += int(ext["length"])
        if depth == 1:
            to_base += int(ext["length"])
        if depth <= 1:
            above_base += int(ext["length"])
    return full, to_base, above_base


def _own_data(image: Path) -> int:
    """Bytes ``image`` stores itself (``qemu-img map`` depth 0)."""
    out = _run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)])
    return sum(int(e["length"]) for e in json.loads(out) if e.get("data") and not e.get("depth", 0))


def build_chain(directory: Path, size: int, *, seed: int = 1, method: str = "random") -> Chain:
    """Create base.qcow2, mid.qcow2 and top.qcow2 in ``directory`` (created if missing).

    Args:
        size: virtual size, a multiple of 1 MiB.
        seed: chooses the extents and the random data; the same seed gives the same chain.
        method: "random" (raw files of random bytes, then qemu-img convert) or "pattern"
            (qemu-io writes with fill patterns).

    Raises:
        ValueError: size is not a positive multiple of 1 MiB, or method is unknown.
        RuntimeError: a qemu-img/qemu-io command failed.
    """
    if size <= 0 or size % EXTENT:
        raise ValueError(f"size must be a positive multiple of 1 MiB, got {size}")
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    base, mid, top = directory / "base.qcow2", directory / "mid.qcow2", directory / "top.qcow2"
    mid_ext, top_ext = _extents_of(size, seed)
    if method == "random":
        gen = _random_source(seed)
        _random_base(base, size, gen)
        for path, extents, backing in ((mid, mid_ext, base), (top, top_ext, mid)):
            raw = path.with_suffix(".raw")
            _write_raw(raw, size, extents, gen)
            _to_qcow2(raw, path, backing)
    elif method == "pattern":
        _run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)])
        step = 64 * MiB
        _qemu_io_writes(
            base, ((o, min(step, size - o), 1 + (o // step) % 250) for o in range(0, size, step))
        )
        for path, extents, backing, salt in ((mid, mid_ext, base, 7), (top, top_ext, mid, 13)):
            _run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    str(backing),
                    "-F",
                    "qcow2",
                    str(path),
                    str(size),
                ]
            )
            _qemu_io_writes(path, ((o, EXTENT, 1 + (o // EXTENT * salt) % 250) for o in extents))
    else:
        raise ValueError(f"unknown method {method!r}")
    full, to_base, above_base = allocation(top)
    return Chain(base, mid, top, size, full, to_base, _own_data(mid), above_base)


def clone_chain(chain: Chain, directory: Path) -> Chain:
    """Copy base, mid and top into ``directory`` and repoint the backing files at the
    copies (so concurrent streams read distinct files)."""
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    base, mid, top = (directory / p.name for p in chain.files())
    for src, dst in zip(chain.files(), (base, mid, top), strict=True):
        _run(["cp", "--reflink=auto", str(src), str(dst)])
    _run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid)])
    _run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top)])
    return replace(chain, base=base, mid=mid, top=top)


def remove_chain(chain: Chain) -> None:
    """Delete the chain's files (and their directory if it is left empty)."""
    for path in chain.files():
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        chain.base.parent.rmdir()


def _compare(directory: Path, size: int) -> None:
    for method in ("random", "pattern"):
        d = directory / method
        t0 = time.perf_counter()
        chain = build_chain(d, size, method=method)
        dt = time.perf_counter() - t0
        print(
            f"{method:8s} {size // MiB} MiB chain built in {dt:.2f} s "
            f"({size / MiB / dt:.0f} MiB/s of virtual size); "
            f"full stream copies {chain.copy_full // MiB} MiB, "
            f"to base {chain.copy_to_base // MiB} MiB"
        )
        shutil.rmtree(d)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.chains DIR [--size MiB] [--method M] [--compare]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("directory", type=Path)
    p.add_argument("--size", type=int, default=64, help="virtual size in MiB (default 64)")
    p.add_argument("--method", choices=("random", "pattern"), default="random")
    p.add_argument("--compare", action="store_true", help="time both methods, keep nothing")
    args = p.parse_args(argv)
    if args.compare:
        _compare(args.directory, args.size * MiB)
        return 0
    t0 = time.perf_counter()
    chain = build_chain(args.directory, args.size * MiB, method=args.method)
    print(f"built {chain} in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of the memory integrity engine (not a test: it asserts nothing about time).

On a 1 GiB raw memory image of mixed random and zero pages it reports:
  * our full hash (Merkle root, all cores) beside ``sha256sum`` and ``openssl dgst -sha256`` of
    the same bytes, as ratios (goal: >= 1.3x faster than openssl on 2 cores);
  * an incremental pass after 1 % of the pages changed, as a ratio of the full pass (goal <= 5 %):
    the pagemap scan (:func:`dirty_ranges` over one 64-bit entry per page) plus re-reading and
    re-hashing the dirty pages from the image and producing the new leaves and root, i.e.
    :func:`rehash_dirty` as ``SoftDirtyTracker.finish`` calls it, then ``root()`` (checked
    against a full re-hash). Soft-dirty bits themselves are not available on the development
    kernel, so the scan runs on synthetic pagemap entries with 1 % soft-dirty;
  * peak RSS of a process hashing a 4 GiB guest image (sparse file with 1 GiB of data), and of
    one hashing the 1 GiB image (goal <= 150 MB for 4 GiB).

Usage: ``python bench/memhash.py [--dir DIR] [--size-mib 1024] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host_agent.memory.dirty import rehash_dirty  # noqa: E402
from host_agent.memory.hasher import default_workers  # noqa: E402
from host_agent.memory.merkle import PAGE_SIZE  # noqa: E402
from host_agent.memory.sources import hash_source  # noqa: E402

MIB = 1 << 20


def make_image(path: Path, size: int, seed: int = 7) -> None:
    """Runs of 1-64 pages, alternately random and zero (about half each)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        done = 0
        random_run = True
        while done < size:
            n = min(rng.randint(1, 64) * PAGE_SIZE, size - done)
            f.write(os.urandom(n) if random_run else bytes(n))
            random_run = not random_run
            done += n


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def best(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    return min(fn() for _ in range(repeat))


def full_pass(path: Path) -> float:
    t0 = time.perf_counter()
    res = hash_source(str(path))
    res.leaves.root()
    return time.perf_counter() - t0


def peak_rss(path: Path) -> int:
    """VmHWM (bytes) of a fresh interpreter that hashes ``path``."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from host_agent.memory.sources import hash_source\n"
        f"r = hash_source({str(path)!r}); r.leaves.root()\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) * 1024


def idle_rss() -> int:
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "import host_agent.memory.sources\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) * 1024


def incremental(path: Path, fraction: float = 0.01, run: int = 1) -> tuple[float, float, int]:
    """Change ``fraction`` of the pages (in runs of ``run`` consecutive pages, scattered
    uniformly), then time scan + re-hash + root against a full pass."""
    base = hash_source(str(path)).leaves
    base.root()  # the background pass computes its root (and node cache) before the stop
    pages = base.pages
    rng = random.Random(1)
    starts = rng.sample(range(0, pages - run, run), int(pages * fraction) // run)
    dirty = sorted(p for s in starts for p in range(s, s + run))
    fd = os.open(path, os.O_RDWR)
    try:
        for p in dirty:
            os.pwrite(fd, os.urandom(16), p * PAGE_SIZE + 100)
        entries = bytearray(struct.pack("<Q", 1 << 63) * pages)
        for p in dirty:
            struct.pack_into("<Q", entries, p * 8, (1 << 63) | (1 << 55))
        pagemap = bytes(entries)
        block = base.names[0]

        def one() -> float:
            # What SoftDirtyTracker.finish does after reading the pagemap: scan the entries,
            # re-read and re-hash the dirty pages over the base, then the new root.
            t0 = time.perf_counter()
            leaves, ranges = rehash_dirty(fd, base, block, pagemap)
            leaves.root()
            elapsed = time.perf_counter() - t0
            assert sum(n for _, n in ranges) == len(dirty)
            return elapsed

        inc = best(one)
        leaves, _ = rehash_dirty(fd, base, block, pagemap)
    finally:
        os.close(fd)
    full = best(lambda: full_pass(path))
    if leaves.root() != hash_source(str(path)).leaves.root():
        raise SystemExit("the incremental root differs from a full re-hash")
    return inc, full, len(dirty)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to write the images (default: temp dir)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        img = Path(tmp) / "guest.raw"
        make_image(img, args.size_mib * MIB)
        subprocess.run(["cat", str(img)], check=True, stdout=subprocess.DEVNULL)  # warm cache
        ours = best(lambda: full_pass(img))
        openssl = best(lambda: timed(["openssl", "dgst", "-sha256", str(img)]))
        sha256sum = best(lambda: timed(["sha256sum", str(img)]), repeat=1)
        zero = hash_source(str(img)).leaves.zero_pages()
        inc, full_again, ndirty = incremental(img)
        inc16, full16, _ = incremental(img, run=16)
        rss_1g = peak_rss(img)
        big = Path(tmp) / "guest4g.raw"
        with open(big, "wb") as f:  # 4 GiB, sparse, 1 GiB of it data (256 MiB every GiB)
            for g in range(4):
                f.seek(g * 1024 * MIB)
                for _ in range(256):
                    f.write(os.urandom(MIB // 2) + bytes(MIB // 2))
            f.truncate(4096 * MIB)
        rss_4g = peak_rss(big)
        idle = idle_rss()
    out = {
        "image_mib": args.size_mib,
        "zero_pages": zero,
        "pages": args.size_mib * MIB // PAGE_SIZE,
        "workers": default_workers(),
        "ours_s": round(ours, 3),
        "openssl_dgst_s": round(openssl, 3),
        "sha256sum_s": round(sha256sum, 3),
        "speedup_vs_openssl": round(openssl / ours, 2),
        "speedup_vs_sha256sum": round(sha256sum / ours, 2),
        "incremental_s": round(inc, 4),
        "incremental_dirty_pages": ndirty,
        "incremental_over_full": round(inc / full_again, 4),
        "incremental_runs16_s": round(inc16, 4),
        "incremental_runs16_over_full": round(inc16 / full16, 4),
        "peak_rss_1g_mb": round(rss_1g / 1e6, 1),
        "peak_rss_4g_mb": round(rss_4g / 1e6, 1),
        "interpreter_baseline_rss_mb": round(idle / 1e6, 1),
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:30} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

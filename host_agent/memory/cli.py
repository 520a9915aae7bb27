"""``vtpm-host memory``: hash guest memory from any source, compare two page sets.

SOURCE is a file (a libvirt save image, a QEMU migration stream, an ELF guest-memory dump or a
raw memory file, told apart by their magic) or ``pid:PID`` for a running or paused QEMU whose RAM
is a memfd. ``diff`` also takes leaf files written by ``hash --leaves``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from host_agent.memory import merkle
from host_agent.memory.hasher import Progress
from host_agent.memory.sources import HashResult, hash_source

__all__ = ["register"]


def _progress(enabled: bool) -> Progress | None:
    if not enabled:
        return None
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.2:
            return
        last[0] = now
        pct = 100.0 * done / total if total else 100.0
        end = "\n" if done >= total else ""
        print(f"\rhashing: {pct:5.1f}% ({done}/{total} pages)", end=end, file=sys.stderr)

    return show


def _load(spec: str, args: argparse.Namespace) -> tuple[merkle.LeafSet, HashResult | None]:
    """A leaf file, or a source hashed now."""
    if not spec.startswith("pid:"):
        try:
            with open(spec, "rb") as f:
                head = f.read(len(merkle.LEAF_FILE_MAGIC))
                if head == merkle.LEAF_FILE_MAGIC:
                    leaves = merkle.parse_leaf_file(head + f.read())
                    return (leaves.select(args.block) if args.block else leaves), None
        except OSError:
            pass  # hash_source reports it as a MemorySourceError
    res = hash_source(
        spec,
        blocks=args.block or None,
        block_name=args.block_name,
        ram_size=args.ram_size,
        workers=args.workers,
        progress=_progress(args.progress),
    )
    for note in res.notes:
        print(f"vtpm-host: {spec}: {note}", file=sys.stderr)
    return res.leaves, res


def _cmd_hash(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    leaves, res = _load(args.source, args)
    seconds = res.seconds if res is not None else time.perf_counter() - t0
    root = leaves.root()
    if args.leaves:
        with open(args.leaves, "wb") as f:
            f.write(merkle.encode_leaf_file(leaves))
    out: dict[str, Any] = {
        "root": root.hex(),
        "pages": leaves.pages,
        "zero_pages": leaves.zero_pages(),
        "bytes": leaves.size,
        "seconds": round(seconds, 6),
        "blocks": [
            {"name": b.name, "pages": b.pages, "root": r.hex()}
            for b, r in zip(leaves.blocks, leaves.block_roots(), strict=True)
        ],
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"root        {out['root']}")
        print(f"pages       {out['pages']} ({out['zero_pages']} zero), {out['bytes']} bytes")
        for b in out["blocks"]:
            print(f"  block {b['name']}: {b['pages']} pages, root {b['root']}")
        print(f"seconds     {out['seconds']:.3f}")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    a, _ = _load(args.a, args)
    b, _ = _load(args.b, args)
    per_block = merkle.diff_blocks(a, b)
    ranges = merkle.diff(a, b)
    equal = not ranges
    if args.json:
        print(
            json.dumps(
                {
                    "equal": equal,
                    "differing_pages": [[x, y] for x, y in ranges],
                    "blocks": {k: [[x, y] for x, y in v] for k, v in per_block.items() if v},
                }
            )
        )
    elif equal:
        print(f"equal: root {a.root().hex()}")
    else:
        print(f"differ: {sum(y - x + 1 for x, y in ranges)} pages")
        for name, rs in per_block.items():
            for x, y in rs:
                span = f"page {x}" if x == y else f"pages {x}-{y}"
                print(f"  {name}: {span} (offset {x * merkle.PAGE_SIZE:#x})")
    return 0 if equal else 1


def register(subparsers: Any) -> None:
    """Add ``memory hash`` and ``memory diff`` to ``vtpm-host``."""
    mem = subparsers.add_parser("memory", help="hash and compare guest memory")
    sub = mem.add_subparsers(dest="memory_command", metavar="SUBCOMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument(
            "--block", action="append", metavar="NAME", help="only this RAM block (repeatable)"
        )
        p.add_argument(
            "--block-name",
            metavar="NAME",
            help="name of the one block of a raw file, ELF dump or pid source (default: the "
            "memory backend id for pid:, else pc.ram)",
        )
        p.add_argument("--ram-size", type=int, metavar="BYTES", help="main RAM size (ELF dumps)")
        p.add_argument("--workers", type=int, metavar="N", help="hashing threads (default: cores)")
        p.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=sys.stderr.isatty(),
            help="show progress on stderr (default: when stderr is a terminal)",
        )

    h = sub.add_parser("hash", help="Merkle root of a memory source")
    h.add_argument("source", help="file (save image, stream, ELF, raw) or pid:PID")
    h.add_argument("--leaves", metavar="OUT", help="write the leaf file here")
    common(h)
    h.set_defaults(func=_cmd_hash)

    d = sub.add_parser(
        "diff",
        help="pages that differ between two sources or leaf files",
        description="Exit status: 0 equal, 1 different, 2 error (e.g. different block sets: "
        "pick the blocks to compare with --block).",
    )
    d.add_argument("a")
    d.add_argument("b")
    common(d)
    d.set_defaults(func=_cmd_diff)

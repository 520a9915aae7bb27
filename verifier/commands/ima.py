"""``vtpm-verify ima``: replay and show IMA runtime measurement lists.

``vtpm-verify ima replay FILE [--json] [--format ascii|binary|auto] [--kernel-rule pre-5.8|5.8]``
prints the PCR 10 the list's complete entries produce (sha1 and sha256 banks) with the counts;
the ``--json`` shape is relied on by scripts::

    {"entries": N, "violations": N, "template_hash_mismatches": N, "truncated_tail": false,
     "pcr10": {"sha1": "<hex>", "sha256": "<hex>"}}

``vtpm-verify ima show FILE [--json] [--format …]`` lists the entries. Malformed input exits 2
with one line on stderr naming the offset (binary) or line (ASCII) and the problem.
"""

from __future__ import annotations

import argparse
from typing import Any

from evidence.ima import ImaEntry, KernelRule, RawImaList, parse_ima_list, replay_ima_pcr10
from verifier._cli import emit_json, read_input

__all__ = ["register"]

_BANKS = ("sha1", "sha256")


def register(subparsers: Any) -> None:
    """Add ``ima replay`` and ``ima show`` to ``vtpm-verify``."""
    ima = subparsers.add_parser(
        "ima",
        help="IMA runtime measurement lists",
        description="Replay or show an IMA runtime measurement list (ASCII or binary).",
    )
    sub = ima.add_subparsers(dest="ima_command", metavar="ACTION", required=True)

    replay = sub.add_parser(
        "replay",
        help="compute PCR 10 from a measurement list",
        description=(
            "Replay PCR 10 (sha1 and sha256 banks) from the complete entries of an IMA list. "
            "A truncated last entry is reported and left out."
        ),
    )
    _common(replay)
    replay.add_argument(
        "--kernel-rule",
        choices=[r.value for r in KernelRule],
        default=KernelRule.V5_8.value,
        help=(
            "how the kernel extended PCR 10: '5.8' (Linux >= 5.8, each bank hashes the template "
            "data itself; default) or 'pre-5.8' (every bank gets the padded SHA-1 template hash)"
        ),
    )
    replay.set_defaults(func=_replay)

    show = sub.add_parser(
        "show", help="list the entries", description="List the entries of an IMA list."
    )
    _common(show)
    show.set_defaults(func=_show)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the list ('-' for standard input)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument(
        "--format",
        choices=["auto", "ascii", "binary"],
        default="auto",
        help="list format (default: detect from the first byte)",
    )


def _parse(args: argparse.Namespace) -> RawImaList:
    return parse_ima_list(read_input(args.file), args.format)


def _replay(args: argparse.Namespace) -> int:
    raw = _parse(args)
    result = replay_ima_pcr10(raw, args.kernel_rule, _BANKS)
    pcr10 = {bank: result.pcr10[bank].hex() for bank in _BANKS}
    if args.json:
        emit_json(
            {
                "entries": result.entries,
                "violations": result.violations,
                "template_hash_mismatches": result.template_hash_mismatches,
                "truncated_tail": result.truncated_tail,
                "pcr10": pcr10,
            }
        )
        return 0
    print(f"format:                   {raw.format}")
    print(f"kernel rule:              {result.rule.value}")
    print(f"entries:                  {result.entries} ({result.replayed} extend PCR 10)")
    print(f"violations:               {result.violations}")
    print(f"template hash mismatches: {result.template_hash_mismatches}", end="")
    if result.mismatched:
        shown = ", ".join(str(raw.entries[i].location) for i in result.mismatched[:10])
        print(f" (at {raw.unit} {shown}{', …' if len(result.mismatched) > 10 else ''})", end="")
    print()
    tail = f"yes, {raw.unit} {raw.truncated_at} left out" if raw.truncated_tail else "no"
    print(f"truncated tail:           {tail}")
    for bank in _BANKS:
        print(f"PCR 10 {bank + ':':<19}{pcr10[bank]}")
    return 0


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def _entry_json(index: int, e: ImaEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": index,
        "location": e.location,
        "pcr": e.pcr,
        "template": e.template_name,
        "template_hash": e.template_hash.hex(),
        "supported": e.supported,
        "violation": e.is_violation,
    }
    if e.supported:
        out["template_hash_ok"] = e.template_hash_ok()
        out["digest"] = f"{e.digest_algo}:{e.digest.hex()}"
        out["name"] = _text(e.name)
        if e.template_name == "ima-sig":
            out["sig"] = e.extra.hex()
        elif e.template_name == "ima-buf":
            out["buf"] = e.extra.hex()
    return out


def _show(args: argparse.Namespace) -> int:
    raw = _parse(args)
    if args.json:
        emit_json(
            {
                "format": raw.format,
                "truncated_tail": raw.truncated_tail,
                "truncated_at": raw.truncated_at,
                "entries": [_entry_json(i, e) for i, e in enumerate(raw.entries)],
            }
        )
        return 0
    loc = "line" if raw.unit == "line" else "offset"
    print(f"{'#':>4} {loc:>7} {'pcr':>3} {'template':<9} {'flags':<12} {'digest':<24} name")
    for i, e in enumerate(raw.entries):
        if not e.supported:
            print(f"{i:>4} {e.location:>7} {e.pcr:>3} {e.template_name:<9} {'unsupported':<12}")
            continue
        flags = "violation" if e.is_violation else ("" if e.template_hash_ok() else "BAD-HASH")
        digest = f"{e.digest_algo}:{e.digest.hex()[:16]}"
        name = _text(e.name)
        if e.extra:
            name += f"  [{'sig' if e.template_name == 'ima-sig' else 'buf'} {len(e.extra)} B]"
        head = f"{i:>4} {e.location:>7} {e.pcr:>3} {e.template_name:<9}"
        print(f"{head} {flags:<12} {digest:<24} {name}")
    print(f"{len(raw.entries)} entries ({raw.format})", end="")
    if raw.truncated_tail:
        print(f"; truncated entry at {raw.unit} {raw.truncated_at} left out", end="")
    print()
    return 0

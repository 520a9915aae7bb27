"""Benchmark: replay IMA lists and firmware event logs, with baselines measured in the same run.

Not a test: it asserts nothing about time. It prints what it measured.

* IMA: a generated list of ``--entries`` ima-ng entries (sha256 file digests), binary and ASCII,
  parsed and replayed (PCR 10, sha1 + sha256 banks, Linux >= 5.8 rule) by ``evidence.ima``.
  Baseline when keylime is installed (dev extra): keylime's own entry parser
  (``keylime.ima.ast.Entry``) on the same ASCII list, plus the sha256 extend loop.
* Firmware: every TCG event log under ``../shared/corpus`` (relative to the repository) that both
  ``evidence.eventlog`` and ``tpm2_eventlog`` accept, parsed and replayed ``--rounds`` times.
  Baseline: ``tpm2_eventlog`` (tpm2-tools), one process per log, output discarded. Our code is
  timed twice: in this process, and as one Python process per log (what a shell script calling a
  CLI would pay), so the ratio is not just process start-up.

Usage: ``python bench/replay.py [--entries N] [--rounds N] [--json]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evidence.errors import VtpmError  # noqa: E402
from evidence.ima import (  # noqa: E402
    ImaEntry,
    encode_ascii,
    encode_binary,
    parse_ima_list,
    replay_ima_pcr10,
)

CORPUS = REPO.parent / "shared" / "corpus"


def _timed(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` runs, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def generate_ima_ng(n: int) -> list[ImaEntry]:
    """``n`` ima-ng entries with sha256 digests; every 1000th is a violation."""
    out = []
    for i in range(n):
        name = f"/usr/lib/x86_64-linux-gnu/lib{i:06d}.so.1".encode()
        if i % 1000 == 999:
            out.append(ImaEntry(10, bytes(20), "ima-ng", (b"sha256:\0" + bytes(32), name + b"\0")))
            continue
        fields = (b"sha256:\0" + hashlib.sha256(name).digest(), name + b"\0")
        td = b"".join(len(f).to_bytes(4, "little") + f for f in fields)
        out.append(ImaEntry(10, hashlib.sha1(td).digest(), "ima-ng", fields))
    return out


def _keylime_replay(text: str) -> bytes:
    logging.getLogger("keylime").setLevel(logging.ERROR)  # no config files here: it warns
    from keylime.common import algorithms  # type: ignore[import-untyped]
    from keylime.ima import ast  # type: ignore[import-untyped]

    pcr = bytes(32)
    for line in text.splitlines():
        entry = ast.Entry(line, None, pcr_hash_alg=algorithms.Hash.SHA256)
        pcr = hashlib.sha256(pcr + entry.pcr_template_hash).digest()
    return pcr


def bench_ima(n: int, repeat: int) -> dict[str, Any]:
    entries = generate_ima_ng(n)
    binary = encode_binary(entries)
    text = encode_ascii(entries)
    result: dict[str, Any] = {"entries": n, "binary_bytes": len(binary), "ascii_bytes": len(text)}
    for fmt, data in (("binary", binary), ("ascii", text)):
        raw = parse_ima_list(data)
        result[f"{fmt}_parse_s"] = _timed(lambda d=data: parse_ima_list(d), repeat)  # type: ignore[misc]
        result[f"{fmt}_replay_s"] = _timed(lambda r=raw: replay_ima_pcr10(r), repeat)  # type: ignore[misc]
        result[f"{fmt}_total_s"] = result[f"{fmt}_parse_s"] + result[f"{fmt}_replay_s"]
        result[f"{fmt}_pcr10_sha256"] = replay_ima_pcr10(raw).pcr10["sha256"].hex()
    logging.getLogger("keylime").setLevel(logging.ERROR)
    try:
        import keylime.ima.ast  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        result["keylime_ascii_s"] = None
    else:
        ascii_text = text.decode()
        got = _keylime_replay(ascii_text)
        result["keylime_agrees"] = got.hex() == result["ascii_pcr10_sha256"]
        result["keylime_ascii_s"] = _timed(lambda: _keylime_replay(ascii_text), 1)
    return result


def _corpus_logs() -> list[Path]:
    logs = sorted(CORPUS.glob("**/*.bin"))
    return [p for p in logs if p.is_file()]


_OUR_ONE_LOG = (
    "import sys; from evidence.eventlog import parse_tcg2_log, replay_pcrs; "
    "replay_pcrs(parse_tcg2_log(open(sys.argv[1], 'rb').read()))"
)


def bench_firmware(rounds: int) -> dict[str, Any]:
    try:
        from evidence.eventlog import parse_tcg2_log, replay_pcrs
    except ImportError as err:
        return {"skipped": f"evidence.eventlog not available: {err}"}
    tool = shutil.which("tpm2_eventlog")
    if tool is None:
        return {"skipped": "tpm2_eventlog (tpm2-tools) not installed"}
    logs: list[tuple[Path, bytes]] = []
    rejected: dict[str, str] = {}
    for path in _corpus_logs():
        data = path.read_bytes()
        try:
            replay_pcrs(parse_tcg2_log(data))
        except VtpmError as err:
            rejected[str(path.relative_to(CORPUS))] = f"ours: {err.id}"
            continue
        proc = subprocess.run([tool, str(path)], capture_output=True, check=False)
        if proc.returncode != 0:
            rejected[str(path.relative_to(CORPUS))] = f"tpm2_eventlog exit {proc.returncode}"
            continue
        logs.append((path, data))
    if not logs:
        return {"skipped": f"no usable logs under {CORPUS}", "rejected": rejected}

    def ours_in_process() -> None:
        for _, data in logs:
            replay_pcrs(parse_tcg2_log(data))

    def ours_per_process() -> None:
        for path, _ in logs:
            subprocess.run(
                [sys.executable, "-c", _OUR_ONE_LOG, str(path)],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.DEVNULL,
                check=True,
            )

    def baseline() -> None:
        for path, _ in logs:
            subprocess.run(
                [tool, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
            )

    events = sum(len(parse_tcg2_log(d).events) for _, d in logs)
    timings = {}
    for name, fn in (
        ("ours_in_process_s", ours_in_process),
        ("ours_process_per_log_s", ours_per_process),
        ("tpm2_eventlog_s", baseline),
    ):
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        timings[name] = time.perf_counter() - t0
    version = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
    return {
        "logs": len(logs),
        "events": events,
        "bytes": sum(len(d) for _, d in logs),
        "rounds": rounds,
        "tpm2_eventlog": _tool_version(version.stdout),
        **timings,
        "ratio_baseline_over_ours_in_process": timings["tpm2_eventlog_s"]
        / timings["ours_in_process_s"],
        "ratio_baseline_over_ours_process_per_log": timings["tpm2_eventlog_s"]
        / timings["ours_process_per_log_s"],
        "rejected": rejected,
    }


def _tool_version(text: str) -> str:
    """``tool="…" version="5.4" …`` → ``tpm2_eventlog 5.4``."""
    for word in text.split():
        if word.startswith("version="):
            return "tpm2_eventlog " + word.split("=", 1)[1].strip('"')
    return "tpm2_eventlog"


def _print_table(ima: dict[str, Any], fw: dict[str, Any]) -> None:
    n = ima["entries"]
    print(f"IMA replay, generated ima-ng list, {n:,} entries (sha1+sha256 banks, rule 5.8)")
    print(f"  {'format':<8} {'size':>10} {'parse':>9} {'replay':>9} {'total':>9} {'entries/s':>11}")
    for fmt in ("binary", "ascii"):
        total = ima[f"{fmt}_total_s"]
        print(
            f"  {fmt:<8} {ima[f'{fmt}_bytes']:>10,} {ima[f'{fmt}_parse_s']:>8.3f}s "
            f"{ima[f'{fmt}_replay_s']:>8.3f}s {total:>8.3f}s {n / total:>11,.0f}"
        )
    if ima.get("keylime_ascii_s") is not None:
        k = ima["keylime_ascii_s"]
        print(
            f"  baseline keylime ast.Entry (ascii, sha256 bank): {k:.3f}s "
            f"(= {k / ima['ascii_total_s']:.2f} x our ascii total; one bank, no template-hash "
            f"check; same PCR: {ima['keylime_agrees']})"
        )
    print()
    if "skipped" in fw:
        print(f"Firmware event logs: skipped ({fw['skipped']})")
        return
    print(
        f"Firmware event logs: {fw['logs']} corpus logs, {fw['events']:,} events, "
        f"{fw['bytes']:,} bytes, {fw['rounds']} rounds (total wall time)"
    )
    rows = (
        ("evidence.eventlog, in process", fw["ours_in_process_s"]),
        ("evidence.eventlog, one python per log", fw["ours_process_per_log_s"]),
        (f"{fw['tpm2_eventlog']}, one per log", fw["tpm2_eventlog_s"]),
    )
    for label, seconds in rows:
        print(f"  {label:<52} {seconds:>8.3f}s  {fw['tpm2_eventlog_s'] / seconds:>7.1f}x")
    print(
        "  (last column: tpm2_eventlog time / this row's time; >1 means faster than tpm2_eventlog)"
    )
    if fw["rejected"]:
        print(f"  left out ({len(fw['rejected'])}): " + ", ".join(sorted(fw["rejected"])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000, help="IMA list size")
    parser.add_argument("--repeat", type=int, default=3, help="IMA timings: best of N")
    parser.add_argument("--rounds", type=int, default=5, help="firmware logs: rounds")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    ima = bench_ima(args.entries, args.repeat)
    fw = bench_firmware(args.rounds)
    if args.json:
        print(json.dumps({"ima": ima, "firmware": fw}, indent=2, sort_keys=True))
    else:
        _print_table(ima, fw)
    return 0


if __name__ == "__main__":
    sys.exit(main())

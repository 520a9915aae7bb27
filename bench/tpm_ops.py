"""Benchmark: host TPM operations through our port next to the same operation via tpm2-tools.

Not a test: it asserts nothing about time. Both sides talk to the same swtpm (a software root
made for the run in a temporary directory, unix socket). swtpm serves one client at a time, so
the port is measured first (its ESAPI context open throughout, as in the daemon), then closed,
then tpm2-tools runs, one process per command, as a shell script would.

* pcrread: ``pcr_values(0..8)`` (two PCR_Read) vs ``tpm2_pcrread sha256:0,…,8``;
* hash: TPM2_Hash with ticket (adapter internal, on its thread) vs ``tpm2_hash -C o -t``;
* create: ``create_exgkey()`` (PCR read, trial policy session, Create) vs ``tpm2_create`` of an
  ECC storage key;
* certify: ``certify("authkey", "aik", q)`` (both keys kept loaded between calls: one
  Certify) vs ``tpm2_certify`` on two saved contexts, then ``tpm2_flushcontext -t``;
* sign: ``sign(vaik, msg, approval)`` (the fleet approval's ticket cached, the vAIK kept
  loaded: Hash, policy of 4 commands in a kept session, Sign) vs ``tpm2_hash`` +
  ``tpm2_sign`` with a restricted key that needs no policy, then a flush;
* attest: ``attest(vaik, q, msg, approval)`` (CertAuthKey, CertvAIK with AuthKey's PCR
  policy, and the vAIK's signature in one call) vs the tools' certify ×2 + hash + sign;
* seal / unseal: ``seal(32 bytes)`` / ``unseal(blob)`` vs ``tpm2_create -i`` /
  ``tpm2_load`` + ``tpm2_unseal`` + flush.

The tools' sign has no policy session (a plain restricted key): ours does strictly more work.
Usage: ``python bench/tpm_ops.py [--rounds N] [--json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from evidence.tpm2_policy import PolicyApproval  # noqa: E402
from host_agent.tpm.adapter import PytssHostTpm  # noqa: E402
from host_agent.tpm.software_root import SoftwareRoot  # noqa: E402

_SRK = "0x81000001"
_SIGN_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
_STORAGE_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda"


def _times(fn: Callable[[], object], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _stats(ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def measure_port(
    tcti: str,
    keys: Path,
    rounds: int,
    connection: Literal["persistent", "shared", "per-call"] = "persistent",
) -> dict[str, dict[str, float]]:
    fleet = ec.derive_private_key(0xBE7C4, ec.SECP256R1())
    fleet_der = fleet.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    results: dict[str, dict[str, float]] = {}
    with PytssHostTpm(tcti, keys, root="software", connection=connection) as tpm:
        tpm.ensure_host_keys()
        vaik = tpm.create_vaik(fleet_der)
        policy = tpm.approved_sign_policy()
        ref = vaik.policy.policy_ref
        approval = PolicyApproval(policy, ref, fleet.sign(policy + ref, ec.ECDSA(hashes.SHA256())))
        blob = tpm.seal(bytes(32))
        ops: dict[str, Callable[[], object]] = {
            "pcrread": lambda: tpm.pcr_values(range(9)),
            # No public hash on the port (it is part of sign); timed on the adapter's thread.
            "hash": lambda: tpm._call(lambda: tpm._hash(b"m" * 64)),
            "create": tpm.create_exgkey,
            "certify": lambda: tpm.certify("authkey", "aik", b"q" * 32),
            "sign": lambda: tpm.sign(vaik, b"vpcrs|nonce|uuid", approval),
            "attest": lambda: tpm.attest(vaik, b"q" * 32, b"vpcrs|nonce|uuid", approval),
            "seal": lambda: tpm.seal(bytes(32)),
            "unseal": lambda: tpm.unseal(blob),
        }
        for name, fn in ops.items():
            fn()  # warm
            results[name] = _stats(_times(fn, rounds))
    return results


def measure_tools(tcti: str, work: Path, rounds: int) -> dict[str, dict[str, float]]:
    env = dict(os.environ, TPM2TOOLS_TCTI=tcti)

    def w(name: str) -> str:
        return str(work / name)

    def run(*argv: str) -> None:
        done = subprocess.run(argv, env=env, capture_output=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.decode(errors='replace')}")

    def seq(*commands: list[str]) -> Callable[[], None]:
        def go() -> None:
            for argv in commands:
                run(*argv)

        return go

    flush = ["tpm2_flushcontext", "-t"]
    signer = ["-G", "ecc256:ecdsa-sha256:null", "-a", _SIGN_ATTRS]
    # Keys for certify/sign: two restricted ECC signers under the SRK, saved as contexts.
    for k in ("a", "b"):
        run("tpm2_create", "-C", _SRK, *signer, "-u", w(f"{k}.pub"), "-r", w(f"{k}.priv"))
        run("tpm2_load", "-C", _SRK, "-u", w(f"{k}.pub"), "-r", w(f"{k}.priv"), "-c", w(f"{k}.ctx"))
        run(*flush)
    (work / "msg").write_bytes(b"vpcrs|nonce|uuid")
    (work / "secret").write_bytes(bytes(32))
    run("tpm2_create", "-C", _SRK, "-i", w("secret"), "-u", w("s.pub"), "-r", w("s.priv"))

    # tpm2-tools 5.4 tpm2_certify has no qualifying-data option: empty qualifyingData.
    certify = ["tpm2_certify", "-c", w("b.ctx"), "-C", w("a.ctx")]
    certify += ["-g", "sha256", "-o", w("attest"), "-s", w("sig")]
    hash_ = ["tpm2_hash", "-C", "o", "-g", "sha256", "-t", w("ticket"), "-o", w("digest")]
    sign = ["tpm2_sign", "-c", w("a.ctx"), "-g", "sha256", "-d", "-t", w("ticket")]
    sign += ["-o", w("sig"), w("digest")]
    create = ["tpm2_create", "-C", _SRK, "-G", "ecc256:aes128cfb", "-a", _STORAGE_ATTRS]
    create += ["-u", w("c.pub"), "-r", w("c.priv")]
    seal = ["tpm2_create", "-C", _SRK, "-i", w("secret"), "-u", w("x.pub"), "-r", w("x.priv")]
    load_sealed = ["tpm2_load", "-C", _SRK, "-u", w("s.pub"), "-r", w("s.priv"), "-c", w("s.ctx")]
    ops: dict[str, Callable[[], object]] = {
        "pcrread": seq(["tpm2_pcrread", "sha256:0,1,2,3,4,5,6,7,8"]),
        "hash": seq([*hash_, w("msg")]),
        "create": seq(create),
        "certify": seq(certify, flush),
        "sign": seq([*hash_, w("msg")], sign, flush),
        "attest": seq(certify, flush, certify, flush, [*hash_, w("msg")], sign, flush),
        "seal": seq(seal),
        "unseal": seq(load_sealed, ["tpm2_unseal", "-c", w("s.ctx"), "-o", w("out")], flush),
    }
    results: dict[str, dict[str, float]] = {}
    for name, fn in ops.items():
        fn()
        results[name] = _stats(_times(fn, rounds))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per operation")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--connection",
        choices=("persistent", "shared", "per-call"),
        default="shared",
        help="the port's connection mode (the software root's default is shared: one "
        "connection under a lease other agent processes can take; per-call: lock, connect, "
        "flush check, disconnect per operation)",
    )
    args = parser.parse_args(argv)
    for tool in ("swtpm", "swtpm_setup", "tpm2_create"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing", file=sys.stderr)
            return 1
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="tpm-bench-") as tmp:
        root = SoftwareRoot(Path(tmp) / "swtpm")
        root.start()
        try:
            mode: Literal["persistent", "shared", "per-call"] = args.connection
            port = measure_port(root.tcti, Path(tmp) / "keys", args.rounds, mode)
            tools = measure_tools(root.tcti, Path(tmp), args.rounds)
        finally:
            root.stop()
    rows: list[dict[str, Any]] = []
    for op in port:
        p, t = port[op]["median_ms"], tools[op]["median_ms"]
        rows.append({"operation": op, "port": port[op], "tpm2_tools": tools[op], "ratio": t / p})
    if args.json:
        doc = {"rounds": args.rounds, "connection": args.connection, "operations": rows}
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"median of {args.rounds} rounds, ms (min-max); ratio = tpm2-tools / port "
        f"({args.connection} connection)"
    )
    print(f"{'operation':<10} {'port':>22} {'tpm2-tools':>24} {'ratio':>7}")
    for r in rows:
        p, t = r["port"], r["tpm2_tools"]
        print(
            f"{r['operation']:<10} {p['median_ms']:>8.2f} ({p['min_ms']:.2f}-{p['max_ms']:.2f})"
            f" {t['median_ms']:>9.2f} ({t['min_ms']:.2f}-{t['max_ms']:.2f}) {r['ratio']:>7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

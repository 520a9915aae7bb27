"""Capture TPM 2.0 structures from a real swtpm with tpm2-tools (by hand; the sim tier reuses it).

This is how the golden vectors in ``tests/vectors/tpm2/`` were made; the vectors tests read the
saved files and never run this script. ``tests/sim/test_tpm2_golden_live.py`` calls
:func:`capture` against the session swtpm, so the codec is also checked against today's producer.

What it makes, all under one owner-hierarchy ECC primary (storage key):

* keys: an ECC P-256 and an RSA-2048 restricted signing key (AKs, fixed ECDSA/RSASSA SHA-256
  scheme), an ECC P-256 and an RSA-2048 unrestricted signing key with a NULL scheme, the RSA one
  duplicable with an authPolicy (PolicyCommandCode(TPM2_Duplicate)), like a vAIK;
  ``<key>.pub`` is TPM2B_PUBLIC from ``tpm2_readpublic -f tss``, ``<key>.name`` the Name from
  ``tpm2_readpublic -n``;
* quotes (``tpm2_quote -m -s -q -o -F values``) by both AKs over sha256 and sha1 PCRs, one of
  them extended first: ``.attest`` is TPMS_ATTEST, ``.sig`` TPMT_SIGNATURE, ``.pcrs`` the values;
* certifications (``tpm2_certify``): each AK certifies a key; tpm2-tools 5.4 has no option for
  qualifying data and always sends ``00ff55aa``, so one more certification with a real
  ``qualifyingData = SHA-256(cert_user ‖ nonce)`` (ARCHITECTURE.md §2) goes through ESAPI;
* signatures (``tpm2_sign``) over one message: ECDSA, RSASSA and RSAPSS, all SHA-256.

``expected.json`` keeps what the independent tools say about each file: the ``tpm2_readpublic``
YAML, ``tpm2_print -t TPMS_ATTEST`` YAML for quotes (it cannot print certify attestations:
"Cannot print unsupported type 0x8017"), tss2-mu's view through tpm2-pytss for certifications, the
signature as ``tpm2_quote`` prints it, and its ``calcDigest``.

Usage: ``.venv/bin/python -m tests.vectors.capture_tpm2 [--out tests/vectors/tpm2]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.swtpm import Swtpm, start_swtpm

OUT = Path(__file__).resolve().parent / "tpm2"

# Fixed inputs, so a re-capture differs only where the TPM adds randomness (keys, ECDSA k, clock).
QUOTE_NONCE = "ab" + "cd" * 15  # starts with a letter: YAML would read leading-digit hex as an int
SIGN_MESSAGE = b"vtpm-trust: a canonical vPCR message signed with TPM2_Sign\n"
CERT_USER = b"CN=tenant-a,O=vtpm-trust vectors"
CERT_NONCE = bytes(range(32))
PCR_EXTEND = {"sha256": "aa" * 32, "sha1": "bb" * 20}
PERSISTENT_PRIMARY = 0x81000A01
# PolicyCommandCode(TPM2_Duplicate), see ../shared/docs/platform-notes.md §3.
DUP_POLICY = bytes.fromhex("bef56b8c1cc84e11edd717528d2cd99356bd2bbf8f015209c3f84aeeaba8e8a2")

SIGN_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"
KEYS: dict[str, str] = {  # name -> tpm2_create options (no spaces inside an argument)
    "ecc_ak": f"-G ecc256:ecdsa-sha256:null -a {SIGN_ATTRS}|restricted",
    "rsa_ak": f"-G rsa2048:rsassa-sha256:null -a {SIGN_ATTRS}|restricted",
    "ecc_sign": f"-G ecc256:null:null -a {SIGN_ATTRS}",
    "rsa_dup": "-G rsa2048:null:null -a sensitivedataorigin|userwithauth|sign -L dup.policy",
}
QUOTES: dict[str, tuple[str, str]] = {  # name -> (signing key, PCR selection; {pcr} is extended)
    "quote_ecc": ("ecc_ak", "sha256:0,1,2,{pcr}+sha1:{pcr}"),
    "quote_rsa": ("rsa_ak", "sha256:{pcr},23+sha1:0,{pcr}"),
}
CERTIFIES: dict[str, tuple[str, str]] = {  # name -> (certified key, signing key)
    "certify_ecc": ("rsa_dup", "ecc_ak"),
    "certify_rsa": ("ecc_ak", "rsa_ak"),
}
SIGNS: dict[str, tuple[str, str]] = {  # name -> (key, tpm2_sign scheme)
    "sign_ecdsa": ("ecc_sign", "ecdsa"),
    "sign_rsassa": ("rsa_dup", "rsassa"),
    "sign_rsapss": ("rsa_dup", "rsapss"),
}


def _transients(tpm: Swtpm) -> set[str]:
    proc = subprocess.run(
        ["tpm2_getcap", "handles-transient"],
        env=tpm.tools_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return {line.lstrip("- ").strip() for line in proc.stdout.splitlines() if line.strip()}


def _run(tpm: Swtpm, cwd: Path, command: str) -> str:
    """Run one tpm2-tools command line, then flush the transient objects it left loaded.

    swtpm has no resource manager and holds 3 transient objects; tools like tpm2_createprimary
    and tpm2_load leave theirs loaded. Only objects this command created are flushed, so objects
    other tests hold in a shared swtpm survive.
    """
    before = _transients(tpm)
    proc = subprocess.run(
        command.split(), cwd=cwd, env=tpm.tools_env(), capture_output=True, text=True, check=False
    )
    for handle in sorted(_transients(tpm) - before):
        subprocess.run(["tpm2_flushcontext", handle], env=tpm.tools_env(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def _evict(tpm: Swtpm) -> None:
    subprocess.run(
        ["tpm2_evictcontrol", "-C", "o", "-c", f"{PERSISTENT_PRIMARY:#x}"],
        env=tpm.tools_env(),
        capture_output=True,
        check=False,
    )


def _yaml(text: str) -> Any:
    # BaseLoader keeps every scalar a string: "070000" stays a bitmap, not the octal int 28672.
    return yaml.load(text, Loader=yaml.BaseLoader)


def tool_versions() -> dict[str, str]:
    """Versions of the producers, for the provenance record."""

    def first_line(*cmd: str) -> str:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
        return (proc.stdout or proc.stderr).strip().splitlines()[0]

    def deb(package: str) -> str:
        return first_line("dpkg-query", "-W", "-f", "${Version}", package)

    import tpm2_pytss  # only the capture needs it; the vectors tests do not

    return {
        "swtpm": first_line("swtpm", "--version"),
        "libtpms0": deb("libtpms0"),
        "tpm2-tools": first_line("tpm2_readpublic", "--version"),
        "libtss2-esys-3.0.2-0": deb("libtss2-esys-3.0.2-0"),
        "tpm2-pytss": getattr(tpm2_pytss, "__version__", "3.0.0"),
    }


def _certify_with_qualifying_data(
    tpm: Swtpm, work: Path, key: str, signer: str, qualifying: bytes, name: str
) -> dict[str, Any]:
    """TPM2_Certify through ESAPI, since tpm2_certify 5.4 cannot pass qualifyingData."""
    from tpm2_pytss import ESAPI, TPM2B_PRIVATE, TPM2B_PUBLIC, TPMT_SIG_SCHEME
    from tpm2_pytss.constants import TPM2_ALG

    with ESAPI(tpm.tcti) as esys:
        parent = esys.tr_from_tpmpublic(PERSISTENT_PRIMARY)
        handles = []
        try:
            for k in (key, signer):
                pub = TPM2B_PUBLIC.unmarshal((work / f"{k}.pub").read_bytes())[0]
                priv = TPM2B_PRIVATE.unmarshal((work / f"{k}.priv").read_bytes())[0]
                handles.append(esys.load(parent, priv, pub))
            attest, signature = esys.certify(
                handles[0], handles[1], qualifying, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
            )
        finally:
            for h in handles:
                esys.flush_context(h)
    (work / f"{name}.attest").write_bytes(bytes(attest.attestationData))
    (work / f"{name}.sig").write_bytes(signature.marshal())
    return _pytss_attest_view(bytes(attest.attestationData))


def _pytss_attest_view(attest: bytes) -> dict[str, Any]:
    """tss2-mu's reading of a TPMS_ATTEST (through tpm2-pytss), as plain JSON."""
    from tpm2_pytss import TPMS_ATTEST

    a = TPMS_ATTEST.unmarshal(attest)[0]
    view: dict[str, Any] = {
        "magic": f"{int(a.magic):08x}",
        "type": f"{int(a.type):04x}",
        "qualifiedSigner": bytes(a.qualifiedSigner).hex(),
        "extraData": bytes(a.extraData).hex(),
        "clockInfo": {
            "clock": str(int(a.clockInfo.clock)),
            "resetCount": str(int(a.clockInfo.resetCount)),
            "restartCount": str(int(a.clockInfo.restartCount)),
            "safe": str(int(a.clockInfo.safe)),
        },
        "firmwareVersion": f"{int(a.firmwareVersion):016x}",
    }
    if int(a.type) == 0x8017:
        view["attested"] = {
            "certify": {
                "name": bytes(a.attested.certify.name).hex(),
                "qualifiedName": bytes(a.attested.certify.qualifiedName).hex(),
            }
        }
    return view


def capture(tpm: Swtpm, out: Path, *, pcr: int = 10) -> dict[str, Any]:
    """Make every vector with ``tpm`` and write it into ``out``; return the expected fields.

    Args:
        tpm: a running swtpm with sha1 and sha256 PCR banks active.
        out: the directory for the binary files (the caller writes ``expected.json``).
        pcr: the PCR extended before quoting (the sim tier uses resettable PCR 16).
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="capture-tpm2-") as tmp:
        work = Path(tmp)
        (work / "dup.policy").write_bytes(DUP_POLICY)
        expected: dict[str, Any] = {"keys": {}, "quotes": {}, "certifies": {}, "signs": {}}

        _run(tpm, work, "tpm2_createprimary -C o -g sha256 -G ecc256:null:aes128cfb -c primary.ctx")
        for key, options in KEYS.items():
            _run(
                tpm,
                work,
                f"tpm2_create -C primary.ctx -g sha256 {options} -u {key}.pub -r {key}.priv",
            )
            _run(tpm, work, f"tpm2_load -C primary.ctx -u {key}.pub -r {key}.priv -c {key}.ctx")
        for key in ["primary", *KEYS]:
            text = _run(
                tpm, work, f"tpm2_readpublic -c {key}.ctx -f tss -o {key}.tss -n {key}.name"
            )
            tss = (work / f"{key}.tss").read_bytes()
            if key != "primary" and tss != (work / f"{key}.pub").read_bytes():
                raise RuntimeError(f"{key}: tpm2_create -u and tpm2_readpublic -o differ")
            (out / f"{key}.pub").write_bytes(tss)
            shutil.copy(work / f"{key}.name", out / f"{key}.name")
            expected["keys"][key] = {
                "pub": f"{key}.pub",
                "name": f"{key}.name",
                "tpm2_readpublic": _yaml(text),
            }

        extend = ",".join(f"{bank}={value}" for bank, value in PCR_EXTEND.items())
        _run(tpm, work, f"tpm2_pcrextend {pcr}:{extend}")
        for name, (key, selection_template) in QUOTES.items():
            selection = selection_template.format(pcr=pcr)
            text = _run(
                tpm,
                work,
                f"tpm2_quote -c {key}.ctx -l {selection} -q {QUOTE_NONCE} -g sha256"
                f" -m {name}.attest -s {name}.sig -o {name}.pcrs -F values",
            )
            printed = _run(tpm, work, f"tpm2_print -t TPMS_ATTEST {name}.attest")
            for suffix in ("attest", "sig", "pcrs"):
                shutil.copy(work / f"{name}.{suffix}", out / f"{name}.{suffix}")
            quote_view = _yaml(text)
            expected["quotes"][name] = {
                "attest": f"{name}.attest",
                "sig": f"{name}.sig",
                "pcrs": f"{name}.pcrs",
                "signer": key,
                "selection": selection,
                "nonce": QUOTE_NONCE,
                "tpm2_print": _yaml(printed),
                "tpm2_quote": {k: quote_view[k] for k in ("signature", "pcrs", "calcDigest")},
            }

        for name, (key, signer) in CERTIFIES.items():
            _run(
                tpm,
                work,
                f"tpm2_certify -c {key}.ctx -C {signer}.ctx -g sha256"
                f" -o {name}.attest -s {name}.sig",
            )
            expected["certifies"][name] = _certify_entry(work, out, name, key, signer)
            expected["certifies"][name]["tpm2_pytss"] = _pytss_attest_view(
                (work / f"{name}.attest").read_bytes()
            )
        _evict(tpm)  # left over by an interrupted run, if any
        _run(tpm, work, f"tpm2_evictcontrol -C o -c primary.ctx {PERSISTENT_PRIMARY:#x}")
        try:
            qualifying = hashlib.sha256(CERT_USER + CERT_NONCE).digest()
            view = _certify_with_qualifying_data(
                tpm, work, "rsa_ak", "ecc_ak", qualifying, "certify_qd_ecc"
            )
        finally:
            _evict(tpm)
        entry = _certify_entry(work, out, "certify_qd_ecc", "rsa_ak", "ecc_ak")
        entry |= {"qualifying_data": qualifying.hex(), "tpm2_pytss": view}
        expected["certifies"]["certify_qd_ecc"] = entry

        (work / "sign.msg").write_bytes(SIGN_MESSAGE)
        shutil.copy(work / "sign.msg", out / "sign.msg")
        for name, (key, scheme) in SIGNS.items():
            _run(
                tpm,
                work,
                f"tpm2_sign -c {key}.ctx -g sha256 -s {scheme} -f tss -o {name}.sig sign.msg",
            )
            shutil.copy(work / f"{name}.sig", out / f"{name}.sig")
            expected["signs"][name] = {
                "message": "sign.msg",
                "sig": f"{name}.sig",
                "signer": key,
                "scheme": scheme,
                "hash": "sha256",
            }
    return expected


def _certify_entry(work: Path, out: Path, name: str, key: str, signer: str) -> dict[str, Any]:
    for suffix in ("attest", "sig"):
        shutil.copy(work / f"{name}.{suffix}", out / f"{name}.{suffix}")
    return {"attest": f"{name}.attest", "sig": f"{name}.sig", "certified": key, "signer": signer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="capture-tpm2-swtpm-") as state:
        tpm = start_swtpm(Path(state))
        try:
            expected = capture(tpm, args.out)
        finally:
            tpm.stop()
    expected = {"producers": tool_versions(), **expected}
    (args.out / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(list(args.out.iterdir()))} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

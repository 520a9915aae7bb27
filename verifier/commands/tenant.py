"""The tenant's commands: ``vtpm-verify enroll``, ``attest`` and ``policy learn``.

``enroll --host URL --vm UUID --cert C --key K --fleet-ca CA`` proves possession of the tenant
certificate to the host's enrollment API (host_agent/service/enroll.py), checks what comes back
(the AIK certificate chains to the fleet CA, CertAuthKey and CertvAIK are signed by the AIK and
AuthKey over SHA-256(cert_user ‖ nonce) and certify the returned keys) and keeps the enrollment
in the tenant's state directory (``--state-dir``, default ``~/.local/share/vtpm-trust``)::

    enrollments/<vm uuid>.json   {"format": "vtpm-trust/tenant-enrollment/1", "vm_uuid", "host",
                                  "cert_user" (b64 DER), "fleet_ca" [b64 DER], "vaik_public" (b64),
                                  "authkey_policies" [hex], "fleet_policy_key_name" (hex),
                                  "vaik_policy_ref" (hex), "generation", "enrolled_at"}

The AuthKey policy and the fleet policy key Name are pinned at enrollment (what the host showed,
certified by its fleet-issued AIK; the vAIK's authPolicy must bind that key) unless the fleet's
own values are given: ``--fleet-policy-key PEM`` (the registrar's ``GET /v1/policy-key``) and
``--trust FILE`` (``{"authkey_policies": [hex], "fleet_policy_key_name": hex}``).

``attest --ssh USER@HOST[:PORT] --identity KEY`` runs ``vtpm-guest quote --nonce HEX`` in the
guest with a fresh nonce, parses and verifies the bundle against the enrollment and, with
``--policy``, evaluates reference values. Exit 0 trusted, 1 untrusted, 2 error (transport, no
enrollment, bad arguments). When the host refuses (the guest agent exits 1), the finding's id is
the host's (``attest.reauth_required`` after a reboot, ``attest.not_enrolled`` for a clone…).
``--json`` prints ``{"trusted", "vm", "findings": [{"id", "severity", "message"}]}``; a failed
check is one finding with its stable id (docs/findings.md).

``policy learn BUNDLE`` verifies a known-good bundle against the enrollment (its own nonce, since
freshness is not the question) and writes reference values that accept exactly it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import shlex
import ssl
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from evidence.aik_cert import verify_aik_certificate
from evidence.bundle import parse_bundle
from evidence.errors import ParseError, VerificationError, VtpmError
from evidence.policy import (
    REFS_FORMAT,
    ReferenceValues,
    encode_reference_values,
    evaluate_reference_values,
    import_keylime_runtime_policy,
    learn_reference_values,
    parse_reference_values,
)
from evidence.tpm2 import (
    TpmsAttest,
    TpmsCertifyInfo,
    TpmtPublic,
    TpmtSignature,
    object_name,
    verify_attest_signature,
)
from evidence.tpm2_policy import fleet_key_name
from evidence.verdict import Finding, Severity, Verdict, finding_from_error
from evidence.verify import (
    VAIK_POLICY_REF,
    AttestedVm,
    VerifyOptions,
    expected_vaik_policy,
    verify_bundle,
)
from verifier._cli import emit_json, read_input
from verifier.ssh import TransportError, parse_target, run_remote

__all__ = [
    "Enrollment",
    "EnrollmentRefused",
    "assess_bundle",
    "load_enrollment",
    "register",
]

EXIT_TRUSTED, EXIT_UNTRUSTED, EXIT_ERROR = 0, 1, 2
_REFUSAL = re.compile(r"host refused \[((?:attest|enroll)\.[a-z0-9_.]+)\]")
ENROLLMENT_FORMAT = "vtpm-trust/tenant-enrollment/1"


class EnrollmentRefused(VtpmError):
    """The host refused the enrollment, or answered with something that does not check out."""

    id: ClassVar[str] = "enroll.refused"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vtpm-trust"


@dataclass(frozen=True)
class Enrollment:
    """What the tenant keeps about one enrolled VM (see the module docstring)."""

    vm_uuid: uuid.UUID
    host: str
    cert_user: bytes
    fleet_ca: tuple[bytes, ...]
    vaik_public: bytes
    authkey_policies: frozenset[bytes]
    fleet_policy_key_name: bytes
    vaik_policy_ref: bytes = VAIK_POLICY_REF
    generation: int = 1
    enrolled_at: str = ""

    def to_json(self) -> dict[str, Any]:
        b64 = _b64
        return {
            "format": ENROLLMENT_FORMAT,
            "vm_uuid": str(self.vm_uuid),
            "host": self.host,
            "cert_user": b64(self.cert_user),
            "fleet_ca": [b64(c) for c in self.fleet_ca],
            "vaik_public": b64(self.vaik_public),
            "authkey_policies": sorted(p.hex() for p in self.authkey_policies),
            "fleet_policy_key_name": self.fleet_policy_key_name.hex(),
            "vaik_policy_ref": self.vaik_policy_ref.hex(),
            "generation": self.generation,
            "enrolled_at": self.enrolled_at,
        }

    @classmethod
    def from_json(cls, obj: Any, what: str) -> Enrollment:
        if not isinstance(obj, dict) or obj.get("format") != ENROLLMENT_FORMAT:
            raise ParseError(what, 0, ENROLLMENT_FORMAT, "another format", unit="path")
        try:
            return cls(
                vm_uuid=uuid.UUID(obj["vm_uuid"]),
                host=str(obj["host"]),
                cert_user=base64.b64decode(obj["cert_user"], validate=True),
                fleet_ca=tuple(base64.b64decode(c, validate=True) for c in obj["fleet_ca"]),
                vaik_public=base64.b64decode(obj["vaik_public"], validate=True),
                authkey_policies=frozenset(bytes.fromhex(p) for p in obj["authkey_policies"]),
                fleet_policy_key_name=bytes.fromhex(obj["fleet_policy_key_name"]),
                vaik_policy_ref=bytes.fromhex(obj["vaik_policy_ref"]),
                generation=int(obj["generation"]),
                enrolled_at=str(obj.get("enrolled_at", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ParseError(what, 0, "a tenant enrollment record", str(err), unit="path") from err

    def options(self, nonce: bytes, now: datetime, **over: Any) -> VerifyOptions:
        args: dict[str, Any] = {
            "nonce": nonce,
            "now": now,
            "fleet_ca_certs": self.fleet_ca,
            "cert_user": self.cert_user,
            "vm_uuid": self.vm_uuid,
            "authkey_policies": self.authkey_policies,
            "fleet_policy_key_name": self.fleet_policy_key_name,
            "vaik_policy_ref": self.vaik_policy_ref,
            "vaik_public": self.vaik_public,
        }
        args.update(over)
        return VerifyOptions(**args)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _enrollment_path(state_dir: Path, vm_uuid: uuid.UUID) -> Path:
    return state_dir / "enrollments" / f"{vm_uuid}.json"


def save_enrollment(state_dir: Path, enrollment: Enrollment) -> Path:
    path = _enrollment_path(state_dir, enrollment.vm_uuid)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(enrollment.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load_enrollment(state_dir: Path, vm_uuid: uuid.UUID | None) -> Enrollment:
    """The enrollment of ``vm_uuid``, or the only one kept when ``vm_uuid`` is None.

    Raises:
        EnrollmentRefused: none kept (or several, and no ``--vm``).
    """
    directory = state_dir / "enrollments"
    if vm_uuid is None:
        found = sorted(directory.glob("*.json")) if directory.is_dir() else []
        if len(found) != 1:
            raise EnrollmentRefused(
                f"{len(found)} enrollments in {directory}: name the VM with --vm UUID"
            )
        path = found[0]
    else:
        path = _enrollment_path(state_dir, vm_uuid)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise EnrollmentRefused(
            f"no enrollment of VM {vm_uuid} in {directory}: run vtpm-verify enroll first"
        ) from err
    except ValueError as err:
        raise ParseError(str(path), 0, "JSON", str(err), unit="path") from err
    return Enrollment.from_json(obj, str(path))


# --------------------------------------------------------------------------------------------
# enroll


def _sign(key: Any, message: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    raise ValueError(f"the tenant key must be EC, RSA or Ed25519, not {type(key).__name__}")


def _load_pem_or_der_certs(data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)
    return [x509.load_der_x509_certificate(data)]


def _post(url: str, body: dict[str, Any], ctx: ssl.SSLContext, timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read()).get("error", {})
        except ValueError:
            detail = {}
        raise EnrollmentRefused(
            f"{url}: {err.code} [{detail.get('id', 'http')}] {detail.get('message', err.reason)}"
        ) from err
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise TransportError(f"{url}: {err}") from err
    if not isinstance(answer, dict):
        raise EnrollmentRefused(f"{url}: the answer is not a JSON object")
    return answer


def _check_certification(
    cert: dict[str, Any], signer: TpmtPublic, certified: TpmtPublic, qualifying: bytes, label: str
) -> None:
    attest_bytes = base64.b64decode(cert["attest"], validate=True)
    signature = TpmtSignature.unmarshal(base64.b64decode(cert["signature"], validate=True))
    verify_attest_signature(attest_bytes, signature, signer)
    attest = TpmsAttest.unmarshal(attest_bytes)
    if attest.extra_data != qualifying:
        raise EnrollmentRefused(f"{label}: qualifying data is not SHA-256(cert_user ‖ nonce)")
    if not isinstance(attest.attested, TpmsCertifyInfo) or attest.attested.name != object_name(
        certified
    ):
        raise EnrollmentRefused(f"{label}: it does not certify the key the host returned")


def check_enrollment_answer(
    answer: dict[str, Any],
    *,
    vm_uuid: uuid.UUID,
    cert_user: bytes,
    nonce: bytes,
    fleet_ca: Sequence[x509.Certificate],
    now: datetime,
) -> tuple[TpmtPublic, dict[str, Any]]:
    """Check the host's enrollment answer; returns the vAIK and the platform facts.

    Raises:
        EnrollmentRefused, ChainError, SignatureError, ParseError: it does not check out.
    """
    try:
        if answer.get("vm_uuid") != str(vm_uuid) or answer.get("cert_user") != _b64(cert_user):
            raise EnrollmentRefused("the host answered for another VM or tenant")
        chain = [base64.b64decode(c, validate=True) for c in answer["aik_certificates"]]
        aik = verify_aik_certificate(chain[0], fleet_ca, now, intermediates=chain[1:])
        authkey = TpmtPublic.unmarshal(base64.b64decode(answer["authkey"]["public"]))
        vaik = TpmtPublic.unmarshal(base64.b64decode(answer["vaik"]["public"]))
        qualifying = hashlib.sha256(cert_user + nonce).digest()
        _check_certification(
            answer["authkey"]["certification"], aik, authkey, qualifying, "CertAuthKey"
        )
        _check_certification(answer["vaik"]["certification"], authkey, vaik, qualifying, "CertvAIK")
        platform = dict(answer["platform"])
        if bytes.fromhex(platform["authkey_policy"]) != authkey.auth_policy:
            raise EnrollmentRefused("the platform policy named is not AuthKey's authPolicy")
        want = expected_vaik_policy(
            bytes.fromhex(platform["fleet_policy_key_name"]),
            bytes.fromhex(platform.get("vaik_policy_ref", VAIK_POLICY_REF.hex())),
        )
        if vaik.auth_policy != want:
            raise EnrollmentRefused(
                "the vAIK's authPolicy does not bind the fleet policy key the host named"
            )
        return vaik, platform
    except (KeyError, TypeError, ValueError) as err:
        raise EnrollmentRefused(f"malformed enrollment answer: {err!r}") from err


def enroll(
    host_url: str,
    vm_uuid: uuid.UUID,
    cert_user: bytes,
    key: Any,
    fleet_ca: Sequence[x509.Certificate],
    *,
    tls_ca: Sequence[x509.Certificate] | None = None,
    trust: dict[str, Any] | None = None,
    fleet_policy_key: ec.EllipticCurvePublicKey | None = None,
    now: datetime | None = None,
    nonce: bytes | None = None,
    timeout: float = 60.0,
) -> Enrollment:
    """Enroll ``vm_uuid`` at ``host_url`` (programmatic form of ``vtpm-verify enroll``)."""
    now = now or datetime.now(UTC)
    nonce = nonce or secrets.token_bytes(32)
    ctx = ssl.create_default_context(
        cadata="".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in (tls_ca or fleet_ca)
        )
    )
    ctx.check_hostname = False  # hosts are named by their fleet id, not by DNS
    base = host_url.rstrip("/")
    challenge_answer = _post(f"{base}/v1/enroll/challenge", {"vm_uuid": str(vm_uuid)}, ctx, timeout)
    try:
        challenge = base64.b64decode(challenge_answer["challenge"], validate=True)
    except (KeyError, TypeError, ValueError) as err:
        raise EnrollmentRefused(f"malformed challenge: {err!r}") from err
    signature = _sign(key, nonce + vm_uuid.bytes + challenge)
    answer = _post(
        f"{base}/v1/enroll",
        {
            "vm_uuid": str(vm_uuid),
            "cert_user": _b64(cert_user),
            "nonce": _b64(nonce),
            "challenge": _b64(challenge),
            "signature": _b64(signature),
        },
        ctx,
        timeout,
    )
    vaik, platform = check_enrollment_answer(
        answer, vm_uuid=vm_uuid, cert_user=cert_user, nonce=nonce, fleet_ca=fleet_ca, now=now
    )
    policies = {bytes.fromhex(platform["authkey_policy"])}
    fleet_name = bytes.fromhex(platform["fleet_policy_key_name"])
    if fleet_policy_key is not None:
        pinned = fleet_key_name(fleet_policy_key)
        if pinned != fleet_name:
            raise EnrollmentRefused(
                f"the host's vAIK binds fleet policy key {fleet_name.hex()}, not the fleet's "
                f"{pinned.hex()} (--fleet-policy-key)"
            )
    if trust is not None:
        policies = {bytes.fromhex(p) for p in trust["authkey_policies"]}
        fleet_name = bytes.fromhex(trust["fleet_policy_key_name"])
    return Enrollment(
        vm_uuid=vm_uuid,
        host=host_url,
        cert_user=cert_user,
        fleet_ca=tuple(c.public_bytes(serialization.Encoding.DER) for c in fleet_ca),
        vaik_public=vaik.marshal(),
        authkey_policies=frozenset(policies),
        fleet_policy_key_name=fleet_name,
        vaik_policy_ref=bytes.fromhex(platform.get("vaik_policy_ref", VAIK_POLICY_REF.hex())),
        generation=int(answer.get("generation", 1)),
        enrolled_at=now.isoformat(),
    )


def _cmd_enroll(args: argparse.Namespace) -> int:
    cert_data = read_input(args.cert)
    cert = _load_pem_or_der_certs(cert_data)[0]
    key = serialization.load_pem_private_key(read_input(args.key), password=None)
    fleet_ca = _load_pem_or_der_certs(read_input(args.fleet_ca))
    trust = json.loads(read_input(args.trust)) if args.trust else None
    policy_key: ec.EllipticCurvePublicKey | None = None
    if args.fleet_policy_key:
        loaded = serialization.load_pem_public_key(read_input(args.fleet_policy_key))
        if not isinstance(loaded, ec.EllipticCurvePublicKey):
            raise ValueError("--fleet-policy-key must be the fleet's ECC P-256 policy key")
        policy_key = loaded
    enrollment = enroll(
        args.host,
        uuid.UUID(args.vm),
        cert.public_bytes(serialization.Encoding.DER),
        key,
        fleet_ca,
        trust=trust,
        fleet_policy_key=policy_key,
    )
    path = save_enrollment(Path(args.state_dir), enrollment)
    if args.json:
        emit_json({"enrolled": True, "vm": str(enrollment.vm_uuid), "state": str(path)})
    else:
        print(f"enrolled VM {enrollment.vm_uuid} at {args.host}; kept in {path}")
    return EXIT_TRUSTED


# --------------------------------------------------------------------------------------------
# attest


def assess_bundle(
    text: str | bytes,
    nonce: bytes,
    enrollment: Enrollment,
    refs: ReferenceValues | None = None,
    *,
    now: datetime | None = None,
    **options: Any,
) -> tuple[Verdict, AttestedVm | None]:
    """Parse, verify and evaluate one bundle; every failure is a finding, never an exception.

    Args:
        options: extra :class:`VerifyOptions` fields (``allow_missing_ima=True`` …).
    """
    opts = enrollment.options(nonce, now or datetime.now(UTC), **options)
    try:
        attested = verify_bundle(parse_bundle(text), opts)
    except (ParseError, VerificationError) as err:
        return Verdict((finding_from_error(err),)), None
    verdict = Verdict()
    if attested.ima_unverified_tail:
        verdict = Verdict(
            (
                Finding(
                    "attest.ima.unverified_tail",
                    Severity.WARNING,
                    f"{attested.ima_unverified_tail} IMA entries were appended after the vPCRs "
                    "were read; they are not verified",
                ),
            )
        )
    if refs is not None:
        verdict = verdict + evaluate_reference_values(attested, refs)
    return verdict, attested


def load_reference_values(path: str) -> ReferenceValues:
    data = read_input(path)
    try:
        fmt = json.loads(data).get("format")
    except (ValueError, AttributeError) as err:
        raise ParseError(path, 0, "a JSON reference-value file", str(err), unit="path") from err
    if fmt == REFS_FORMAT:
        return parse_reference_values(data)
    return ReferenceValues(ima=import_keylime_runtime_policy(data))  # a Keylime runtime policy


def _report(args: argparse.Namespace, vm: uuid.UUID | str, verdict: Verdict) -> int:
    if args.json:
        emit_json(
            {
                "trusted": verdict.trusted,
                "vm": str(vm),
                "findings": [
                    {"id": f.id, "severity": str(f.severity), "message": f.message}
                    for f in verdict.findings
                ],
            }
        )
    else:
        print(f"VM {vm}: {'TRUSTED' if verdict.trusted else 'NOT TRUSTED'}")
        for f in verdict.findings:
            print(f"  [{f.severity}] {f.id}: {f.message}")
    return EXIT_TRUSTED if verdict.trusted else EXIT_UNTRUSTED


def _cmd_attest(args: argparse.Namespace) -> int:
    enrollment = load_enrollment(Path(args.state_dir), uuid.UUID(args.vm) if args.vm else None)
    refs = load_reference_values(args.policy) if args.policy else None
    nonce = secrets.token_bytes(32)
    command = f"{args.guest_command} quote --nonce {nonce.hex()}"
    result = run_remote(
        parse_target(args.ssh),
        Path(args.identity),
        command,
        host_key=args.host_key,
        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
        command_timeout=args.timeout,
    )
    if result.exit_status != 0:
        message = result.stderr.decode(errors="replace").strip() or f"exit {result.exit_status}"
        if result.exit_status == 1:  # the host refused: not enrolled now, or rebooted
            m = _REFUSAL.search(message)  # the host's own id, e.g. attest.reauth_required
            finding = Finding(m[1] if m else "attest.host_refused", Severity.ERROR, message)
            return _report(args, enrollment.vm_uuid, Verdict((finding,)))
        raise TransportError(f"{shlex.split(args.guest_command)[0]} failed: {message}")
    verdict, _ = assess_bundle(
        result.stdout,
        nonce,
        enrollment,
        refs,
        allow_missing_eventlog=args.allow_missing_eventlog,
        allow_missing_ima=args.allow_missing_ima,
    )
    if args.save_bundle:
        Path(args.save_bundle).write_bytes(result.stdout)
    return _report(args, enrollment.vm_uuid, verdict)


def _cmd_learn(args: argparse.Namespace) -> int:
    text = read_input(args.bundle)
    raw = parse_bundle(text)
    enrollment = load_enrollment(
        Path(args.state_dir), uuid.UUID(args.vm) if args.vm else raw.vm_uuid
    )
    verdict, attested = assess_bundle(
        text,
        raw.nonce,
        enrollment,
        allow_missing_eventlog=args.allow_missing_eventlog,
        allow_missing_ima=args.allow_missing_ima,
    )
    if attested is None:
        _report(argparse.Namespace(json=args.json), raw.vm_uuid, verdict)
        print("vtpm-verify: refusing to learn from a bundle that does not verify", file=sys.stderr)
        return EXIT_UNTRUSTED
    refs = learn_reference_values(attested, pin_pcrs=args.pin_pcr)
    out = encode_reference_values(refs)
    written = None
    if args.output and args.output != "-":
        # Whole or not at all: a policy file half written would refuse (or accept) the wrong VM.
        written = Path(args.output)
        tmp = written.with_name(f".{written.name}.tmp")
        tmp.write_text(out + "\n")
        os.replace(tmp, written)
    if args.json:
        emit_json(
            {
                "trusted": True,
                "vm": str(raw.vm_uuid),
                "output": None if written is None else str(written),
                "reference_values": json.loads(out),
            }
        )
    elif written is None:
        sys.stdout.write(out + "\n")
    return EXIT_TRUSTED


# --------------------------------------------------------------------------------------------
# argparse


def _guard(fn: Any) -> Any:
    """Misuse found late (a bad --ssh, an unreadable key) is exit 2 with one line, no traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except (ValueError, TypeError) as err:
            print(f"vtpm-verify: error: {err}", file=sys.stderr)
            return EXIT_ERROR

    return run


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        default=str(default_state_dir()),
        help="the tenant's state directory (default ~/.local/share/vtpm-trust)",
    )


def _allow(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-missing-eventlog", action="store_true", help="accept no firmware log")
    p.add_argument("--allow-missing-ima", action="store_true", help="accept no IMA list")


def register(subparsers: Any) -> None:
    """Add ``enroll``, ``attest`` and ``policy learn`` to ``vtpm-verify``."""
    p = subparsers.add_parser(
        "enroll",
        help="enroll a VM you rent with your certificate",
        description="Prove possession of your certificate to the VM's host and keep the "
        "enrollment (vAIK, host, certificate, fleet CA) in your state directory.",
    )
    p.add_argument("--host", required=True, metavar="URL", help="the host's enrollment API")
    p.add_argument("--vm", required=True, metavar="UUID")
    p.add_argument("--cert", required=True, metavar="C", help="your certificate (PEM or DER)")
    p.add_argument("--key", required=True, metavar="K", help="its private key (PEM)")
    p.add_argument("--fleet-ca", required=True, metavar="CA", help="the fleet CA certificate(s)")
    p.add_argument(
        "--trust",
        metavar="FILE",
        help='{"authkey_policies": [hex], "fleet_policy_key_name": hex} from the fleet',
    )
    p.add_argument(
        "--fleet-policy-key",
        metavar="PEM",
        help="the fleet policy key (registrar GET /v1/policy-key): the vAIK must bind it",
    )
    p.add_argument("--json", action="store_true")
    _state(p)
    p.set_defaults(func=_guard(_cmd_enroll))

    a = subparsers.add_parser(
        "attest",
        help="attest an enrolled VM over SSH",
        description="Run vtpm-guest quote in the guest with a fresh nonce and verify the "
        "evidence. Exit 0 trusted, 1 untrusted, 2 error.",
    )
    a.add_argument("--ssh", required=True, metavar="USER@HOST[:PORT]")
    a.add_argument("--identity", required=True, metavar="KEY", help="SSH private key")
    a.add_argument("--policy", metavar="P", help="reference values (ours or a Keylime policy)")
    a.add_argument("--vm", metavar="UUID", help="which enrollment (default: the only one)")
    a.add_argument("--json", action="store_true")
    a.add_argument("--host-key", metavar="'TYPE BASE64'", help="pin the guest's SSH host key")
    a.add_argument("--known-hosts", metavar="FILE", help="default ~/.ssh/known_hosts")
    a.add_argument("--guest-command", default="vtpm-guest", help="how to run the guest agent")
    a.add_argument("--timeout", type=float, default=60.0, help="seconds for the guest command")
    a.add_argument("--save-bundle", metavar="FILE", help="also write the bundle here")
    _allow(a)
    _state(a)
    a.set_defaults(func=_guard(_cmd_attest))

    pol = subparsers.add_parser("policy", help="reference values")
    sub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    learn = sub.add_parser(
        "learn",
        help="write reference values from a known-good bundle",
        description="Verify BUNDLE against your enrollment and print reference values that "
        "accept exactly it (firmware events, IMA entries).",
    )
    learn.add_argument("bundle", metavar="BUNDLE")
    learn.add_argument("-o", "--output", metavar="FILE", help="default stdout")
    learn.add_argument("--vm", metavar="UUID", help="default: the bundle's VM")
    learn.add_argument("--pin-pcr", type=int, action="append", default=[], metavar="N")
    learn.add_argument(
        "--json",
        action="store_true",
        help="one JSON document: {trusted, vm, output, reference_values} (or the refusal's "
        "findings); with -o the file is still written",
    )
    _allow(learn)
    _state(learn)
    learn.set_defaults(func=_guard(_cmd_learn))

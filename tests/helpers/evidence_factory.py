"""Build complete, valid evidence bundles for tests, and the options that verify them.

Two kinds of key material, labelled as such wherever they are used:

* **software-signed** (:class:`SoftKey`, :class:`World`): AIK, AuthKey and vAIK are
  ``cryptography`` ECC P-256 keys in TPMT_PUBLIC form with the same templates and policies the
  host agent gives the real keys (host_agent/tpm/keys.py); the TPMS_ATTEST of each TPM2_Certify
  is marshalled with :mod:`evidence.tpm2` and signed in software. Fast, deterministic, and able to
  make every forgery a test needs (a rogue CA, another host's AuthKey, a forged signature).
* **TPM-signed** (tests/sim/test_verify_real_tpm.py): the same :func:`assemble_bundle` is fed
  by the host agent's ``PytssHostTpm`` on a real swtpm, so CertAuthKey, CertvAIK and the
  attestation signature are made by a TPM.

The fleet CA and AIK certificates come from the registrar's own :class:`FleetCa`
(verifier/registrar/ca.py), so the certificate profile is exactly the one production issues.
Measurements (:class:`Boot`) are a synthetic crypto-agile firmware log (sha1 + sha256) and an
ima-ng IMA list, with the vPCRs they replay to.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from evidence import tpm2_policy
from evidence.attestation import AttestationMessage, encode_attestation_message
from evidence.bundle import RawBundle, make_bundle
from evidence.eventlog import parse_tcg2_log, replay_pcrs
from evidence.ima import ImaEntry, encode_binary, parse_ima_list, replay_ima_pcr10
from evidence.tpm2 import (
    TpmAlgId,
    TpmaObject,
    TpmEccCurve,
    TpmsAttest,
    TpmsCertifyInfo,
    TpmsClockInfo,
    TpmsEccParms,
    TpmsEccPoint,
    TpmsSignatureEcc,
    TpmtPublic,
    TpmtScheme,
    TpmtSignature,
    TpmtSymDefObject,
    object_name,
)
from evidence.verify import (
    VAIK_POLICY_REF,
    VerifyOptions,
    authkey_policy_digests,
    expected_vaik_policy,
    qualifying_data,
)
from verifier.registrar.ca import FleetCa, new_ca_certificate

__all__ = [
    "NOW",
    "Boot",
    "Host",
    "SoftKey",
    "Tenant",
    "World",
    "assemble_bundle",
    "default_world",
    "ima_ng_entry",
    "make_boot",
    "make_event_log",
    "tenant_certificate",
]

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
"""The fixed "now" every test verifies at."""

SHA1, SHA256 = TpmAlgId.TPM_ALG_SHA1, TpmAlgId.TPM_ALG_SHA256
_A = TpmaObject
AIK_ATTRIBUTES = (
    _A.FIXEDTPM
    | _A.FIXEDPARENT
    | _A.SENSITIVEDATAORIGIN
    | _A.USERWITHAUTH
    | _A.RESTRICTED
    | _A.SIGN_ENCRYPT
)
AUTHKEY_ATTRIBUTES = (
    _A.FIXEDTPM | _A.FIXEDPARENT | _A.SENSITIVEDATAORIGIN | _A.RESTRICTED | _A.SIGN_ENCRYPT
)
VAIK_ATTRIBUTES = _A.SENSITIVEDATAORIGIN | _A.RESTRICTED | _A.SIGN_ENCRYPT


_DER = Encoding.DER


def _key(seed: int) -> ec.EllipticCurvePrivateKey:
    """A deterministic P-256 key (tests are reproducible and fast)."""
    return ec.derive_private_key(seed, ec.SECP256R1())


# --------------------------------------------------------------------------------------------
# Software-signed TPM keys


@dataclass(frozen=True)
class SoftKey:
    """Software-signed stand-in for a TPM signing key: a P-256 key in TPMT_PUBLIC form."""

    private: ec.EllipticCurvePrivateKey
    public: TpmtPublic

    @classmethod
    def make(cls, seed: int, attributes: int, auth_policy: bytes = b"") -> SoftKey:
        private = _key(seed)
        numbers = private.public_key().public_numbers()
        public = TpmtPublic(
            name_alg=SHA256,
            object_attributes=int(attributes),
            auth_policy=auth_policy,
            parameters=TpmsEccParms(
                symmetric=TpmtSymDefObject(TpmAlgId.TPM_ALG_NULL),
                scheme=TpmtScheme(TpmAlgId.TPM_ALG_ECDSA, SHA256),
                curve_id=TpmEccCurve.TPM_ECC_NIST_P256,
                kdf=TpmtScheme(TpmAlgId.TPM_ALG_NULL),
            ),
            unique=TpmsEccPoint(numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")),
        )
        return cls(private, public)

    @property
    def public_bytes(self) -> bytes:
        return self.public.marshal()

    @property
    def name(self) -> bytes:
        return object_name(self.public)

    def sign(self, data: bytes) -> bytes:
        """TPMT_SIGNATURE (ECDSA-SHA256) over ``data``, as TPM2_Sign would make it."""
        r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
        sig = TpmsSignatureEcc(r.to_bytes(32, "big"), s.to_bytes(32, "big"))
        return TpmtSignature(TpmAlgId.TPM_ALG_ECDSA, SHA256, sig).marshal()

    def certify(self, obj: TpmtPublic, qualifying: bytes) -> tuple[bytes, bytes]:
        """A software-made TPM2_Certify: (TPMS_ATTEST bytes, TPMT_SIGNATURE bytes)."""
        name = object_name(obj)
        attest = TpmsAttest(
            qualified_signer=self.name,
            extra_data=qualifying,
            clock_info=TpmsClockInfo(clock=123456, reset_count=3, restart_count=0, safe=True),
            firmware_version=0x2019102300163636,
            attested=TpmsCertifyInfo(name=name, qualified_name=name),
        ).marshal()
        return attest, self.sign(attest)


# --------------------------------------------------------------------------------------------
# Measurements


def _spec_id_record(algs: Sequence[tuple[int, int]]) -> bytes:
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBB", 0, 0, 2, 0, 2)
    body += struct.pack("<I", len(algs)) + b"".join(struct.pack("<HH", a, s) for a, s in algs)
    body += b"\x00"
    return struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + body


def _agile_event(pcr: int, etype: int, data: bytes) -> bytes:
    digests = [(SHA1, hashlib.sha1(data).digest()), (SHA256, hashlib.sha256(data).digest())]
    out = struct.pack("<III", pcr, etype, len(digests))
    out += b"".join(struct.pack("<H", alg) + d for alg, d in digests)
    return out + struct.pack("<I", len(data)) + data


def make_event_log(boot_id: int = 0, kernel: bytes = b"vmlinuz-6.1.0-56-amd64") -> bytes:
    """A crypto-agile firmware log (sha1 + sha256): POST code, boot variables and a kernel on
    PCR 0-7 and separators. ``boot_id`` goes into PCR 1's event, as a boot counter would."""
    events = [
        _agile_event(0, 0x1, b"SeaBIOS 1.16.2"),  # EV_POST_CODE
        _agile_event(1, 0x80000002, b"BootOrder boot#%d" % boot_id),  # EV_EFI_VARIABLE_BOOT
        _agile_event(4, 0xD, kernel),  # EV_IPL
        _agile_event(5, 0x80000007, b"Calling EFI Application from Boot Option"),
    ]
    separators = [_agile_event(pcr, 0x4, b"\x00\x00\x00\x00") for pcr in range(8)]
    return _spec_id_record([(SHA1, 20), (SHA256, 32)]) + b"".join(events + separators)


def ima_ng_entry(
    path: bytes, content: bytes, *, pcr: int = 10, digest: bytes | None = None
) -> ImaEntry:
    """An ima-ng entry measuring ``content`` (sha256, or ``digest``) as ``path``, with its true
    template hash."""
    file_digest = hashlib.sha256(content).digest() if digest is None else digest
    fields = (b"sha256:\x00" + file_digest, path + b"\x00")
    hash_input = b"".join(struct.pack("<I", len(f)) + f for f in fields)
    return ImaEntry(pcr, hashlib.sha1(hash_input).digest(), "ima-ng", fields)


DEFAULT_FILES: tuple[tuple[bytes, bytes], ...] = (
    (b"boot_aggregate", b"aggregate"),
    (b"/usr/bin/bash", b"bash 5.2"),
    (b"/usr/sbin/sshd", b"openssh 9.2"),
    (b"/usr/bin/python3.11", b"python 3.11.2"),
    (b"/tmp/build/a.out", b"scratch binary"),
)


@dataclass(frozen=True)
class Boot:
    """One boot's measurement lists and the sha256 vPCRs they replay to (PCR 0-10)."""

    event_log: bytes
    ima_list: bytes
    ima_entries: tuple[ImaEntry, ...]
    vpcrs: Mapping[int, bytes]


def make_boot(
    boot_id: int = 0,
    files: Sequence[tuple[bytes, bytes]] = DEFAULT_FILES,
    *,
    kernel: bytes = b"vmlinuz-6.1.0-56-amd64",
) -> Boot:
    """A boot; a ``boot_aggregate`` file gets the real aggregate, SHA-256 over vPCRs 0-9."""
    event_log = make_event_log(boot_id, kernel)
    fw = replay_pcrs(parse_tcg2_log(event_log))["sha256"]
    vpcrs = {i: fw.get(i, bytes(32)) for i in range(10)}
    aggregate = hashlib.sha256(b"".join(vpcrs[i] for i in range(10))).digest()
    entries = tuple(
        ima_ng_entry(path, content, digest=aggregate if path == b"boot_aggregate" else None)
        for path, content in files
    )
    ima_list = encode_binary(entries)
    pcr10 = replay_ima_pcr10(parse_ima_list(ima_list, "binary"), "5.8", ("sha256",)).pcr10
    vpcrs[10] = pcr10["sha256"]
    return Boot(event_log, ima_list, entries, vpcrs)


# --------------------------------------------------------------------------------------------
# Assembling a bundle from any key backend (software here, a real TPM in tests/sim)


def assemble_bundle(
    *,
    vm_uuid: uuid.UUID,
    nonce: bytes,
    cert_user: bytes,
    vpcrs: Mapping[int, bytes],
    aik_certificates: Sequence[bytes],
    authkey_public: bytes,
    vaik_public: bytes,
    certify_authkey: Callable[[bytes], tuple[bytes, bytes]],
    certify_vaik: Callable[[bytes], tuple[bytes, bytes]],
    sign: Callable[[bytes], bytes],
    event_log: bytes | None,
    ima_list: bytes | None,
    hash_alg: int = SHA256,
    message_nonce: bytes | None = None,
    message_vm_uuid: uuid.UUID | None = None,
    qualifying_cert_user: bytes | None = None,
) -> RawBundle:
    """What the host and the guest agent do together, as the protocol says (ARCHITECTURE.md §3).

    ``certify_*(qualifying_data) -> (attest, signature)`` and ``sign(message) -> signature`` are
    the key backend. The ``message_*``/``qualifying_*`` overrides make inconsistent evidence.
    """
    message = encode_attestation_message(
        AttestationMessage(
            vm_uuid=message_vm_uuid or vm_uuid,
            nonce=message_nonce or nonce,
            hash_alg=hash_alg,
            pcrs=vpcrs,
        )
    )
    qd = qualifying_data(qualifying_cert_user or cert_user, nonce)
    return make_bundle(
        vm_uuid=vm_uuid,
        nonce=nonce,
        cert_user=cert_user,
        attestation_message=message,
        attestation_signature=sign(message),
        vaik_public=vaik_public,
        cert_vaik=certify_vaik(qd),
        authkey_public=authkey_public,
        cert_authkey=certify_authkey(qd),
        aik_certificates=aik_certificates,
        event_log=event_log,
        ima_list=ima_list,
        ima_format="binary",
    )


# --------------------------------------------------------------------------------------------
# A software-signed world: fleet, hosts, tenants, one enrolled VM


def tenant_certificate(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A self-signed tenant certificate (cert_user), DER."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") | 1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(encoding=_DER)


def make_fleet(seed: int, name: str = "vtpm-trust fleet CA") -> FleetCa:
    key = _key(seed)
    cert = new_ca_certificate(key, common_name=name, now=NOW - timedelta(days=30), serial=seed)
    return FleetCa(key=key, certificate=cert, policy_key=_key(seed + 1))


@dataclass(frozen=True)
class Host:
    """A software-signed host: AIK with its fleet certificate, AuthKey bound to a platform state."""

    name: str
    aik: SoftKey
    aik_certificates: tuple[bytes, ...]
    authkey: SoftKey
    platform_composite: bytes

    @classmethod
    def make(cls, fleet: FleetCa, name: str, seed: int) -> Host:
        aik = SoftKey.make(seed, AIK_ATTRIBUTES)
        composite = tpm2_policy.pcr_composite_digest([bytes([seed % 256]) * 32] * 9)
        policy = tpm2_policy.policy_locality(
            tpm2_policy.policy_pcr(tpm2_policy.empty_digest(), range(9), composite), 0
        )
        authkey = SoftKey.make(seed + 1, AUTHKEY_ATTRIBUTES, policy)
        cert = fleet.issue_aik_certificate(
            name,
            aik.private.public_key(),
            aik.name,
            aik.public_bytes,
            now=NOW - timedelta(days=1),
            lifetime=timedelta(days=365),
            serial=seed,
        )
        return cls(name, aik, (cert.public_bytes(_DER),), authkey, composite)


@dataclass(frozen=True)
class Tenant:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert_user: bytes

    @classmethod
    def make(cls, name: str, seed: int) -> Tenant:
        key = _key(seed)
        return cls(name, key, tenant_certificate(key, name))


@dataclass(frozen=True)
class World:
    """A fleet with two hosts, two tenants and VM ``vm_uuid`` of tenant A enrolled on host A.

    Every key is software-signed (see the module docstring).
    """

    fleet: FleetCa
    rogue_ca: FleetCa
    host_a: Host
    host_b: Host
    tenant_a: Tenant
    tenant_b: Tenant
    vm_uuid: uuid.UUID
    vaik: SoftKey
    boot: Boot

    @classmethod
    def create(cls) -> World:
        fleet = make_fleet(0xF1EE7)
        fleet_name = tpm2_policy.fleet_key_name(fleet.policy_key.public_key())
        vaik_policy = expected_vaik_policy(fleet_name, VAIK_POLICY_REF)
        return cls(
            fleet=fleet,
            rogue_ca=make_fleet(0xBAD0, "vtpm-trust fleet CA"),  # same name, other key
            host_a=Host.make(fleet, "host-a.example", 0xA0A0),
            host_b=Host.make(fleet, "host-b.example", 0xB0B0),
            tenant_a=Tenant.make("tenant-a", 0x7E1A),
            tenant_b=Tenant.make("tenant-b", 0x7E1B),
            vm_uuid=uuid.UUID("0d9c7a7e-5b1e-4f7e-9a57-3c1b2a4e6f80"),
            vaik=SoftKey.make(0x5A1C, VAIK_ATTRIBUTES, vaik_policy),
            boot=make_boot(),
        )

    @property
    def fleet_policy_key_name(self) -> bytes:
        return tpm2_policy.fleet_key_name(self.fleet.policy_key.public_key())

    def vaik_for(self, seed: int) -> SoftKey:
        """Another vAIK with the right policy (e.g. a clone's, or a replaced key)."""
        return SoftKey.make(seed, VAIK_ATTRIBUTES, expected_vaik_policy(self.fleet_policy_key_name))

    def options(self, nonce: bytes, **overrides: Any) -> VerifyOptions:
        """What tenant A's verifier passes: fleet CA, approved host states, enrolled vAIK."""
        policies = authkey_policy_digests(self.host_a.platform_composite) | (
            authkey_policy_digests(self.host_b.platform_composite)
        )
        args: dict[str, Any] = {
            "nonce": nonce,
            "now": NOW,
            "fleet_ca_certs": (self.fleet.certificate,),
            "cert_user": self.tenant_a.cert_user,
            "vm_uuid": self.vm_uuid,
            "authkey_policies": policies,
            "fleet_policy_key_name": self.fleet_policy_key_name,
            "vaik_public": self.vaik.public_bytes,
        }
        args.update(overrides)
        return VerifyOptions(**args)

    def bundle(
        self,
        nonce: bytes,
        *,
        host: Host | None = None,
        vaik: SoftKey | None = None,
        tenant: Tenant | None = None,
        vm_uuid: uuid.UUID | None = None,
        boot: Boot | None = None,
        event_log: bytes | str | None = "boot",
        ima_list: bytes | str | None = "boot",
        aik_certificates: Sequence[bytes] | None = None,
        authkey_signer: SoftKey | None = None,
        vaik_certifier: SoftKey | None = None,
        message_signer: SoftKey | None = None,
        **assemble: Any,
    ) -> RawBundle:
        """A software-signed bundle; every keyword swaps one part for a test's variant."""
        host = host or self.host_a
        vaik = vaik or self.vaik
        tenant = tenant or self.tenant_a
        boot = boot or self.boot
        aik_signer = authkey_signer or host.aik
        vaik_signer = vaik_certifier or host.authkey
        msg_signer = message_signer or vaik
        return assemble_bundle(
            vm_uuid=vm_uuid or self.vm_uuid,
            nonce=nonce,
            cert_user=tenant.cert_user,
            vpcrs=assemble.pop("vpcrs", boot.vpcrs),
            aik_certificates=(
                host.aik_certificates if aik_certificates is None else aik_certificates
            ),
            authkey_public=host.authkey.public_bytes,
            vaik_public=vaik.public_bytes,
            certify_authkey=lambda qd: aik_signer.certify(host.authkey.public, qd),
            certify_vaik=lambda qd: vaik_signer.certify(vaik.public, qd),
            sign=msg_signer.sign,
            event_log=boot.event_log if event_log == "boot" else event_log,  # type: ignore[arg-type]
            ima_list=boot.ima_list if ima_list == "boot" else ima_list,  # type: ignore[arg-type]
            **assemble,
        )


@functools.cache
def default_world() -> World:
    """One shared software-signed :class:`World` (creating it costs a few milliseconds)."""
    return World.create()

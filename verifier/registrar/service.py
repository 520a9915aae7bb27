"""The registrar service: admits hosts into the fleet (ARCHITECTURE.md §3 "Host admission").

One object, two ways in: the HTTPS server (:mod:`verifier.registrar.server`) calls it for each
request, and single-host setups call it in-process (embedded mode). Both speak the API-v1 JSON
bodies of :mod:`verifier.registrar.messages`, so a host's registration client cannot tell them
apart.

Admission, in order (each step raises a typed :class:`RegistrationRefused` and stores nothing):

``start`` (``POST /v1/registrations``)
    1. parse the request (shape only);
    2. check the AIK public area: restricted, fixedTPM, fixedParent, sensitiveDataOrigin, sign,
       ECC P-256, ECDSA/SHA-256 (:func:`keys.check_aik_public`);
    3. pick the first EK whose public area suits MakeCredential and whose certificate chains to
       the EK CA bundle and certifies exactly that public key
       (:func:`ekcert.verify_ek_certificate`);
    4. refuse a host id admitted with another EK, or an EK admitted under another host id;
    5. MakeCredential(EK, 32 random bytes, Name(AIK)) and remember a digest of the secret,
       single-use, for ``challenge_ttl``.

``activate`` (``POST /v1/registrations/<id>/activation``)
    6. take the challenge (it is gone afterwards: a replay finds nothing); refuse it if expired;
    7. compare the returned secret in constant time: only the TPM holding that EK, with that AIK
       loaded, can have recovered it (TPM2_ActivateCredential checks the Name);
    8. check the CSR's self-signature and key;
    9. issue the AIK certificate and the mTLS certificate from the fleet CA, and store the host.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from evidence.errors import VtpmError
from evidence.tpm2_policy import PolicyApproval, name_of_public
from verifier.registrar.ca import FleetCa
from verifier.registrar.credential import make_credential
from verifier.registrar.ekcert import EkTrustBundle, VerifiedEkCertificate, verify_ek_certificate
from verifier.registrar.errors import (
    ActivationFailed,
    ChallengeRejected,
    CsrRejected,
    EkCertificateRejected,
    RegistrationRefused,
)
from verifier.registrar.keys import CheckedAik, CheckedEk, check_aik_public, check_ek_public
from verifier.registrar.messages import (
    EndorsementKey,
    RegistrationRequest,
    b64,
    parse_activation_request,
    parse_registration_request,
)
from verifier.registrar.store import AdmittedHost, PendingChallenge, RegistrarStore

__all__ = ["RegistrarOptions", "RegistrarService"]

_CHALLENGE_ID = re.compile(r"^[0-9a-f]{32}$")
_SECRET_SIZE = 32


@dataclass(frozen=True)
class RegistrarOptions:
    """Tunables of admission (secure defaults).

    Attributes:
        challenge_ttl: how long a host has to answer a challenge.
        aik_lifetime: validity of issued AIK certificates.
        tls_lifetime: validity of issued mTLS certificates.
    """

    challenge_ttl: timedelta = timedelta(minutes=5)
    aik_lifetime: timedelta = timedelta(days=3650)
    tls_lifetime: timedelta = timedelta(days=825)


@dataclass(frozen=True)
class _ChosenEk:
    endorsement: EndorsementKey
    checked: CheckedEk
    verified: VerifiedEkCertificate

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.endorsement.public).hexdigest()


class RegistrarService:
    """Admission of hosts, the fleet CA certificate, and platform-policy approvals.

    Args:
        ca: the fleet CA and policy keys.
        bundle: the EK CA certificates trusted to vouch for EKs.
        store: admitted hosts and pending challenges.
        options: challenge lifetime and certificate lifetimes.
        clock: returns the current time, timezone-aware UTC.
        random_bytes: a source of random bytes (:func:`secrets.token_bytes`).
    """

    def __init__(
        self,
        ca: FleetCa,
        bundle: EkTrustBundle,
        store: RegistrarStore,
        *,
        options: RegistrarOptions,
        clock: Callable[[], datetime],
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self._ca = ca
        self._bundle = bundle
        self._store = store
        self._options = options
        self._clock = clock
        self._random = random_bytes

    # -- read-only ------------------------------------------------------------------------

    def ca_certificate(self) -> bytes:
        """The fleet CA certificate, PEM (``GET /v1/ca``)."""
        return self._ca.certificate_pem

    def policy_key(self) -> dict[str, str]:
        """The fleet policy key (``GET /v1/policy-key``).

        Keys: ``tpmt_public`` (base64 TPMT_PUBLIC to load with TPM2_LoadExternal), ``name`` (its
        TPM Name, hex), ``spki_der`` (base64 DER SubjectPublicKeyInfo, what
        ``HostTpm.create_vaik`` takes) and ``pem``.
        """
        public = self._ca.policy_key_public()
        key = self._ca.policy_key.public_key()
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        return {
            "tpmt_public": b64(public),
            "name": name_of_public(public).hex(),
            "spki_der": b64(key.public_bytes(serialization.Encoding.DER, spki)),
            "pem": key.public_bytes(serialization.Encoding.PEM, spki).decode(),
        }

    def hosts(self) -> list[AdmittedHost]:
        return self._store.hosts()

    def host(self, host_id: str) -> AdmittedHost | None:
        return self._store.host(host_id)

    def remove_host(self, host_id: str) -> bool:
        """Forget an admitted host so that it can be admitted again with another TPM.

        Its certificates are not revoked (the fleet CA publishes no CRL yet): they stay valid
        until they expire.
        """
        return self._store.remove(host_id)

    # -- admission ------------------------------------------------------------------------

    def start(self, body: object) -> dict[str, str]:
        """Steps 1-5: check the host's keys and answer with a credential challenge."""
        request = parse_registration_request(body)
        now = self._clock()
        aik = check_aik_public(request.aik_public)
        chosen = self._choose_ek(request, now)
        self._store.check_conflict(request.host_id, chosen.digest)
        secret = self._random(_SECRET_SIZE)
        made = make_credential(
            chosen.checked.protector, secret, aik.name, random_bytes=self._random
        )
        challenge_id = self._random(16).hex()
        expires_at = now + self._options.challenge_ttl
        self._store.purge_expired(now)
        self._store.add_challenge(
            PendingChallenge(
                challenge_id=challenge_id,
                host_id=request.host_id,
                request=json.dumps(
                    {
                        "request": request.to_json(),
                        "ek_index": request.endorsement_keys.index(chosen.endorsement),
                    }
                ),
                ek_kind=chosen.endorsement.kind,
                secret_digest=hashlib.sha256(secret).digest(),
                expires_at=expires_at,
            )
        )
        return {
            "challenge_id": challenge_id,
            "ek_kind": chosen.endorsement.kind,
            "credential_blob": b64(made.credential_blob),
            "encrypted_secret": b64(made.encrypted_secret),
            "expires_at": expires_at.isoformat(),
        }

    def activate(self, challenge_id: str, body: object) -> dict[str, str]:
        """Steps 6-9: check the recovered secret, then certify the AIK and the mTLS key."""
        if not isinstance(challenge_id, str) or not _CHALLENGE_ID.match(challenge_id):
            raise ChallengeRejected(
                f"challenge id: expected 32 lower-case hex digits, got {str(challenge_id)[:40]!r}"
            )
        activation = parse_activation_request(body)
        pending = self._store.take_challenge(challenge_id)
        if pending is None:
            raise ChallengeRejected(
                f"challenge {challenge_id}: unknown or already answered (a challenge is "
                "single-use); start a new registration"
            )
        now = self._clock()
        if now > pending.expires_at:
            raise ChallengeRejected(
                f"challenge {challenge_id}: expired at {pending.expires_at.isoformat()}, "
                f"answered at {now.isoformat()}; start a new registration"
            )
        if not hmac.compare_digest(
            hashlib.sha256(activation.secret).digest(), pending.secret_digest
        ):
            raise ActivationFailed(
                f"host {pending.host_id!r}: the secret returned is not the one the challenge "
                "protected: the AIK is not in the same TPM as the EK (or the wrong EK or AIK was "
                "used for TPM2_ActivateCredential)"
            )
        stored = json.loads(pending.request)
        request = parse_registration_request(stored["request"])
        endorsement = request.endorsement_keys[int(stored["ek_index"])]
        aik = check_aik_public(request.aik_public)
        chosen = self._verify_ek(endorsement, now)
        tls_key, dns_names, ips = self._check_csr(activation.csr, request.host_id)
        self._store.check_conflict(request.host_id, chosen.digest)
        return self._admit(request, chosen, aik, tls_key, dns_names, ips, now)

    # -- helpers --------------------------------------------------------------------------

    def _verify_ek(self, endorsement: EndorsementKey, now: datetime) -> _ChosenEk:
        checked = check_ek_public(endorsement.public)
        actual = "rsa" if isinstance(checked.key, rsa.RSAPublicKey) else "ecc"
        if endorsement.kind != actual:
            raise EkCertificateRejected(
                f"EK at NV 0x{endorsement.nv_index:08x}: declared kind {endorsement.kind!r}, "
                f"but its public area is an {actual.upper()} key"
            )
        verified = verify_ek_certificate(
            endorsement.certificate, checked.key, self._bundle, now=now
        )
        return _ChosenEk(endorsement, checked, verified)

    def _choose_ek(self, request: RegistrationRequest, now: datetime) -> _ChosenEk:
        failures: list[tuple[EndorsementKey, VtpmError]] = []
        for endorsement in request.endorsement_keys:
            try:
                return self._verify_ek(endorsement, now)
            except VtpmError as err:
                failures.append((endorsement, err))
        if len(failures) == 1 or len({type(e) for _, e in failures}) == 1:
            first = failures[0][1]
            if isinstance(first, RegistrationRefused):
                detail = "; ".join(
                    f"{ek.kind} EK (NV 0x{ek.nv_index:08x}): {e}" for ek, e in failures
                )
                raise type(first)(detail) from first
            raise first
        detail = "; ".join(f"{ek.kind} EK (NV 0x{ek.nv_index:08x}): {e}" for ek, e in failures)
        raise EkCertificateRejected(f"no endorsement key was accepted: {detail}")

    def _check_csr(
        self, pem: bytes, host_id: str
    ) -> tuple[ec.EllipticCurvePublicKey | rsa.RSAPublicKey, tuple[str, ...], tuple[str, ...]]:
        try:
            csr = x509.load_pem_x509_csr(pem)
        except ValueError as err:
            raise CsrRejected(f"mTLS CSR: expected a PEM PKCS#10 request, got {err}") from err
        if not csr.is_signature_valid:
            raise CsrRejected("mTLS CSR: its self-signature does not verify")
        key = csr.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in ("secp256r1", "secp384r1"):
                raise CsrRejected(f"mTLS CSR: expected a P-256/P-384 key, got {key.curve.name}")
        elif isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise CsrRejected(f"mTLS CSR: expected RSA ≥ 2048 bits, got {key.key_size}")
        else:
            raise CsrRejected(f"mTLS CSR: expected an ECC or RSA key, got {type(key).__name__}")
        dns: list[str] = [host_id]
        ips: list[str] = []
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = None
        except ValueError as err:
            raise CsrRejected(f"mTLS CSR: unreadable extensions ({err})") from err
        if san is not None:
            for name in san.get_values_for_type(x509.DNSName):
                if name not in dns:
                    dns.append(name)
            ips += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        return key, tuple(dns), tuple(ips)

    def _serial(self) -> int:
        return int.from_bytes(self._random(16), "big") >> 1 | 1

    def _admit(
        self,
        request: RegistrationRequest,
        chosen: _ChosenEk,
        aik: CheckedAik,
        tls_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        dns_names: tuple[str, ...],
        ips: tuple[str, ...],
        now: datetime,
    ) -> dict[str, str]:
        aik_cert = self._ca.issue_aik_certificate(
            request.host_id,
            aik.key,
            aik.name,
            request.aik_public,
            now=now,
            lifetime=self._options.aik_lifetime,
            serial=self._serial(),
        )
        tls_cert = self._ca.issue_tls_certificate(
            request.host_id,
            tls_key,
            dns_names=dns_names,
            ip_addresses=ips,
            now=now,
            lifetime=self._options.tls_lifetime,
            serial=self._serial(),
        )
        aik_pem = aik_cert.public_bytes(serialization.Encoding.PEM).decode()
        tls_pem = tls_cert.public_bytes(serialization.Encoding.PEM).decode()
        self._store.admit(
            AdmittedHost(
                host_id=request.host_id,
                ek_digest=chosen.digest,
                ek_kind=chosen.endorsement.kind,
                ek_public=chosen.endorsement.public,
                ek_certificate=chosen.endorsement.certificate,
                aik_public=request.aik_public,
                aik_name=aik.name.hex(),
                aik_certificate=aik_pem,
                tls_certificate=tls_pem,
                admitted_at=now,
            )
        )
        return {
            "host_id": request.host_id,
            "aik_name": aik.name.hex(),
            "aik_certificate": aik_pem,
            "tls_certificate": tls_pem,
            "ca_certificate": self._ca.certificate_pem.decode(),
        }

    # -- platform policy --------------------------------------------------------------------

    def approve_platform_policy(
        self, pcr_policy_digest: bytes, policy_ref: bytes
    ) -> PolicyApproval:
        """Sign and record a PolicyAuthorize approval with the fleet policy key.

        An operator action (``vtpm-verify registrar approve``), never reachable over HTTPS.
        Approving the same policy twice returns the approval already on record. An approval
        cannot be revoked by deleting it: hosts that fetched it keep a valid signature.
        """
        approval = self._ca.approve_platform_policy(pcr_policy_digest, policy_ref)
        signature = self._store.add_approval(
            approval.approved_policy, approval.policy_ref, approval.signature, self._clock()
        )
        return PolicyApproval(approval.approved_policy, approval.policy_ref, signature)

    def policy_approvals(self) -> dict[str, object]:
        """``GET /v1/policy-approvals``: the fleet policy key and every approval on record."""
        return {
            "policy_key": self.policy_key(),
            "approvals": [
                {
                    "approved_policy": policy.hex(),
                    "policy_ref": ref.hex(),
                    "signature": b64(signature),
                    "approved_at": at.isoformat(),
                }
                for policy, ref, signature, at in self._store.approvals()
            ],
        }

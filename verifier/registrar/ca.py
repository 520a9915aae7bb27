"""The fleet CA: issues AIK certificates and mTLS identities, and signs platform-policy approvals.

Two keys, both ECDSA P-256, both created once by ``vtpm-verify registrar init`` (see
:mod:`verifier.registrar.state` for the files):

* the **fleet CA key** signs a self-signed CA certificate, the AIK certificates of admitted hosts,
  their mTLS client/server certificates, and the registrar's own HTTPS certificate;
* the **fleet policy key** signs PolicyAuthorize approvals of host PCR0-8 policies
  (:meth:`FleetCa.approve_platform_policy`); hosts load its public part into their TPM with
  ``TPM2_LoadExternal`` (:func:`evidence.tpm2_policy.fleet_key_public`).

Certificate building takes ``now`` and ``serial`` as parameters (no clock, no randomness here).

The AIK certificate (what every attestation chain starts from, ARCHITECTURE.md §2):
subject ``CN=<host id>``; the AIK's public key; KeyUsage digitalSignature; EKU
tcg-kp-AIKCertificate (2.23.133.8.3); BasicConstraints CA=FALSE; and two non-critical
extensions, each a DER OCTET STRING: :data:`TPM_OBJECT_NAME_OID` (the AIK's TPM Name,
``nameAlg ‖ H(TPMT_PUBLIC)``) and :data:`TPM_PUBLIC_OID` (the AIK's TPMT_PUBLIC), so a verifier
holding only the certificate can check CertAuthKey against the exact public area the registrar
admitted. The profile's OIDs, extension coding and verification live in the leaf module
:mod:`evidence.aik_cert`, shared with the host agent and the verifiers; they are re-exported here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from evidence import aik_cert
from evidence.aik_cert import (
    TCG_KP_AIK_CERTIFICATE,
    TPM_OBJECT_NAME_OID,
    TPM_PUBLIC_OID,
    VTPM_TRUST_OID_ARC,
    encode_octet_string,
)
from evidence.errors import VtpmError
from evidence.tpm2_policy import PolicyApproval, approval_digest, fleet_key_public

__all__ = [
    "TCG_KP_AIK_CERTIFICATE",
    "TPM_OBJECT_NAME_OID",
    "TPM_PUBLIC_OID",
    "VTPM_TRUST_OID_ARC",
    "FleetCa",
    "aik_name_from_certificate",
    "aik_public_from_certificate",
    "new_ca_certificate",
]

_CA_LIFETIME = timedelta(days=20 * 365)
_BACKDATE = timedelta(minutes=5)


def aik_name_from_certificate(cert: x509.Certificate) -> bytes:
    """The TPM Name carried in an AIK certificate (:data:`TPM_OBJECT_NAME_OID`).

    Raises:
        ValueError: the extension is missing or not a DER OCTET STRING.
    """
    try:
        return aik_cert.aik_name_from_certificate(cert)
    except VtpmError as err:
        raise ValueError(str(err)) from err


def aik_public_from_certificate(cert: x509.Certificate) -> bytes:
    """The marshalled TPMT_PUBLIC carried in an AIK certificate (:data:`TPM_PUBLIC_OID`).

    Raises:
        ValueError: the extension is missing or not a DER OCTET STRING.
    """
    try:
        return aik_cert.aik_public_from_certificate(cert)
    except VtpmError as err:
        raise ValueError(str(err)) from err


def new_ca_certificate(
    key: ec.EllipticCurvePrivateKey, *, common_name: str, now: datetime, serial: int
) -> x509.Certificate:
    """A self-signed fleet CA certificate (CA=TRUE, pathLen 0, keyCertSign|cRLSign)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _key_usage(*, digital_signature: bool, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class FleetCa:
    """The fleet CA key and certificate, and the fleet policy key."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    policy_key: ec.EllipticCurvePrivateKey

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def _builder(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        *,
        now: datetime,
        lifetime: timedelta,
        serial: int,
    ) -> x509.CertificateBuilder:
        not_after = min(now + lifetime, self.certificate.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )

    def issue_aik_certificate(
        self,
        host_id: str,
        aik_key: ec.EllipticCurvePublicKey,
        aik_name: bytes,
        aik_public: bytes,
        *,
        now: datetime,
        lifetime: timedelta,
        serial: int,
    ) -> x509.Certificate:
        """Certify an admitted host's AIK (layout in the module docstring)."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)])
        return (
            self._builder(subject, aik_key, now=now, lifetime=lifetime, serial=serial)
            .add_extension(
                _key_usage(digital_signature=True, key_encipherment=False), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage([TCG_KP_AIK_CERTIFICATE]), critical=False)
            .add_extension(
                x509.UnrecognizedExtension(TPM_OBJECT_NAME_OID, encode_octet_string(aik_name)),
                critical=False,
            )
            .add_extension(
                x509.UnrecognizedExtension(TPM_PUBLIC_OID, encode_octet_string(aik_public)),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue_tls_certificate(
        self,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        *,
        dns_names: tuple[str, ...],
        ip_addresses: tuple[str, ...] = (),
        now: datetime,
        lifetime: timedelta,
        serial: int,
    ) -> x509.Certificate:
        """An mTLS certificate (serverAuth + clientAuth) for a host or for the registrar."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        return (
            self._builder(subject, public_key, now=now, lifetime=lifetime, serial=serial)
            .add_extension(
                _key_usage(
                    digital_signature=True,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def policy_key_public(self) -> bytes:
        """TPMT_PUBLIC of the fleet policy key, as hosts load it with TPM2_LoadExternal."""
        return fleet_key_public(self.policy_key.public_key())

    def approve_platform_policy(
        self, pcr_policy_digest: bytes, policy_ref: bytes
    ) -> PolicyApproval:
        """Sign a PolicyAuthorize approval of a host PCR0-8 policy digest.

        The TPM's PolicyAuthorize checks a signature over ``aHash = SHA-256(approvedPolicy ‖
        policyRef)`` (:func:`evidence.tpm2_policy.approval_digest`); this is an ECDSA-SHA256
        signature of ``approvedPolicy ‖ policyRef``, i.e. over exactly that digest.

        Args:
            pcr_policy_digest: the 32-byte PolicyPCR(…) digest of an approved platform state.
            policy_ref: the policyRef the vAIK policy binds (≤ 32 bytes).

        Raises:
            ValueError: a digest of the wrong size or an oversized policy_ref.
        """
        approval_digest(pcr_policy_digest, policy_ref)  # validates sizes
        signature = self.policy_key.sign(pcr_policy_digest + policy_ref, ec.ECDSA(hashes.SHA256()))
        return PolicyApproval(
            approved_policy=pcr_policy_digest, policy_ref=policy_ref, signature=signature
        )

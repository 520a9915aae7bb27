"""A tpm2-pytss stand-in for the host TPM port, for the registrar's sim tests.

Until ``host_agent/tpm``'s adapter lands, these tests drive swtpm through ESAPI directly, as the
host side of admission: EK certificates from NV, EK public areas from the persistent EK handles
swtpm_setup creates, an AIK (restricted ECC P-256 signing primary key in the owner hierarchy), and
TPM2_ActivateCredential with the EK authorized by its TCG policy (PolicySecret(endorsement), plus
PolicyOR with PolicyC for the high-range P-384 EK). The tests in this module check the stand-in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST,
    TPMT_SYM_DEF,
)

from evidence.tpm2 import TpmtPublic, object_name
from tests.helpers.swtpm import Swtpm

EK_HANDLES = {"rsa": 0x81010001, "ecc": 0x81010016}
EK_CERT_INDICES = (0x01C00002, 0x01C00016)
# TCG EK Credential Profile 2.x: PolicyA (PolicySecret(TPM_RH_ENDORSEMENT)) and PolicyC, SHA-384;
# the high-range EK's authPolicy is PolicyB = PolicyOR(PolicyA, PolicyC).
POLICY_A_SHA384 = bytes.fromhex(
    "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e"
    "143e8bb1133824ccb431053871c6db53"
)
POLICY_C_SHA384 = bytes.fromhex(
    "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5"
    "b4947c2d73e63005eed2dc2b3593d165"
)
_AIK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)


def aik_template(
    spec: str = "ecc256:ecdsa-sha256", attributes: int = _AIK_ATTRIBUTES
) -> TPM2B_PUBLIC:
    template = TPM2B_PUBLIC.parse(spec, objectAttributes=attributes)
    if template.publicArea.type == TPM2_ALG.ECC:
        template.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL
    else:
        template.publicArea.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG.NULL
    return template


class EsapiHostTpm:
    """The admission subset of the HostTpm port, over tpm2-pytss ESAPI (tests only)."""

    def __init__(self, tpm: Swtpm, template: TPM2B_PUBLIC | None = None) -> None:
        self.esys = ESAPI(tpm.tcti)
        self._aik, pub, *_ = self.esys.create_primary(
            TPM2B_SENSITIVE_CREATE(), template or aik_template(), ESYS_TR.OWNER
        )
        self._aik_public = bytes(pub.publicArea.marshal())

    def close(self) -> None:
        self.esys.flush_context(self._aik)
        self.esys.close()

    def ek_certificates(self) -> list[tuple[int, bytes]]:
        out = []
        for index in EK_CERT_INDICES:
            handle = self.esys.tr_from_tpmpublic(index)
            size = self.esys.nv_read_public(handle)[0].nvPublic.dataSize
            data = b""
            while len(data) < size:
                chunk = min(1024, size - len(data))
                data += bytes(self.esys.nv_read(handle, chunk, len(data), auth_handle=handle))
            out.append((index, data))
        return out

    def _ek(self, kind: str) -> ESYS_TR:
        return self.esys.tr_from_tpmpublic(EK_HANDLES[kind])

    def ek_public(self, kind: Literal["rsa", "ecc"] = "rsa") -> bytes:
        return bytes(self.esys.read_public(self._ek(kind))[0].publicArea.marshal())

    def aik_public(self) -> bytes:
        return self._aik_public

    def aik_name(self) -> bytes:
        return object_name(TpmtPublic.unmarshal(self._aik_public))

    def activate_credential(
        self,
        credential_blob: bytes,
        encrypted_secret: bytes,
        ek_kind: Literal["rsa", "ecc"] = "rsa",
        *,
        activate_handle: ESYS_TR | None = None,
    ) -> bytes:
        ek = self._ek(ek_kind)
        name_alg = TPM2_ALG.SHA384 if ek_kind == "ecc" else TPM2_ALG.SHA256
        session = self.esys.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            name_alg,
        )
        try:
            self.esys.policy_secret(ESYS_TR.ENDORSEMENT, session)
            if ek_kind == "ecc":
                self.esys.policy_or(session, TPML_DIGEST([POLICY_A_SHA384, POLICY_C_SHA384]))
            blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
            out = self.esys.activate_credential(
                self._aik if activate_handle is None else activate_handle,
                ek,
                blob,
                secret,
                session1=ESYS_TR.PASSWORD,
                session2=session,
            )
        finally:
            self.esys.flush_context(session)
        return bytes(out)


def test_stand_in_reads_both_ek_certificates(
    swtpm_factory: Callable[..., Swtpm],
) -> None:
    host = EsapiHostTpm(swtpm_factory("a", provision_ek=True))
    try:
        certs = dict(host.ek_certificates())
        assert set(certs) == set(EK_CERT_INDICES)
        assert all(der[0] == 0x30 for der in certs.values())
        assert TpmtPublic.unmarshal(host.ek_public("ecc")).name_alg == 0x000C
        assert host.aik_name()[:2] == b"\x00\x0b"
    finally:
        host.close()

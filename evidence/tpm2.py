"""TPM 2.0 structures: TPMT_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE, TPML_PCR_SELECTION, TPM2B_*.

Everything here follows TPM 2.0 Library Part 2 ("Structures"), big-endian as the TPM marshals it.

Rules this module lives by:

* ``X.unmarshal(data)`` takes the whole structure and nothing else: trailing bytes are an error. It
  returns a frozen dataclass or raises a :class:`~evidence.errors.ParseError` subclass carrying the
  byte offset and what was expected there (invariant 4: never a traceback, never a partial result).
* ``x.marshal()`` gives back exactly the bytes that were parsed, so signatures and Names can be
  recomputed from the dataclasses. Constructors validate shape and raise ``ValueError`` on misuse.
* Variants we do not handle (another attestation type, an HMAC signature, a KEYEDHASH object) raise
  :class:`~evidence.errors.UnsupportedError`: they are reported, never guessed at.
* A size field is checked against its spec maximum and against the bytes that remain before any
  allocation, so a TPM2B claiming 65535 bytes in a 40-byte input is a short error, not a read.
* Parsing checks shape, never truth: :func:`verify_attest_signature` and :func:`verify_signature`
  are the only functions here that say a signature holds.

Layout: this module is the public face and holds no code; import from it. The parts, each of
which imports only the ones above it (never this module):

* :mod:`evidence._tpm2_constants`: :class:`TpmAlgId`, :class:`TpmSt`, :class:`TpmEccCurve`,
  :class:`TpmaObject`, :data:`TPM_GENERATED_VALUE`, :data:`TPM2B_MAX_SIZES` and the algorithm sets
  each structure admits.
* :mod:`evidence._tpm2_marshal`: the reading and writing primitives, and
  :func:`unmarshal_tpm2b` / :func:`marshal_tpm2b`.
* :mod:`evidence._tpm2_public`: :class:`TpmtPublic` and its parts, TPM2B_PUBLIC.
* :mod:`evidence._tpm2_pcr`: :class:`TpmsPcrSelection` and :class:`TpmlPcrSelection`.
* :mod:`evidence._tpm2_attest`: :class:`TpmsAttest` and its parts, TPM2B_ATTEST, and
  :class:`TpmtSignature`.
* :mod:`evidence._tpm2_crypto`: :func:`object_name`, :func:`public_key`, :func:`quote_pcr_digest`
  and the signature checks, the only part that calls ``cryptography``.
"""

from __future__ import annotations

from evidence._tpm2_attest import (
    TpmsAttest,
    TpmsCertifyInfo,
    TpmsClockInfo,
    TpmsQuoteInfo,
    TpmsSignatureEcc,
    TpmsSignatureRsa,
    TpmtSignature,
    marshal_tpm2b_attest,
    unmarshal_tpm2b_attest,
)
from evidence._tpm2_constants import (
    TPM2B_MAX_SIZES,
    TPM_GENERATED_VALUE,
    TpmAlgId,
    TpmaObject,
    TpmEccCurve,
    TpmSt,
)
from evidence._tpm2_crypto import (
    object_name,
    public_key,
    quote_pcr_digest,
    verify_attest_signature,
    verify_signature,
)
from evidence._tpm2_marshal import marshal_tpm2b, unmarshal_tpm2b
from evidence._tpm2_pcr import TpmlPcrSelection, TpmsPcrSelection
from evidence._tpm2_public import (
    TpmsEccParms,
    TpmsEccPoint,
    TpmsRsaParms,
    TpmtPublic,
    TpmtScheme,
    TpmtSymDefObject,
    marshal_tpm2b_public,
    unmarshal_tpm2b_public,
)

__all__ = [
    "TPM2B_MAX_SIZES",
    "TPM_GENERATED_VALUE",
    "TpmAlgId",
    "TpmEccCurve",
    "TpmSt",
    "TpmaObject",
    "TpmlPcrSelection",
    "TpmsAttest",
    "TpmsCertifyInfo",
    "TpmsClockInfo",
    "TpmsEccParms",
    "TpmsEccPoint",
    "TpmsPcrSelection",
    "TpmsQuoteInfo",
    "TpmsRsaParms",
    "TpmsSignatureEcc",
    "TpmsSignatureRsa",
    "TpmtPublic",
    "TpmtScheme",
    "TpmtSignature",
    "TpmtSymDefObject",
    "marshal_tpm2b",
    "marshal_tpm2b_attest",
    "marshal_tpm2b_public",
    "object_name",
    "public_key",
    "quote_pcr_digest",
    "unmarshal_tpm2b",
    "unmarshal_tpm2b_attest",
    "unmarshal_tpm2b_public",
    "verify_attest_signature",
    "verify_signature",
]

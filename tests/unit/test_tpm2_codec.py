"""evidence.tpm2: round trips, hostile inputs, Names, key conversion and signature checks.

Golden bytes from a real TPM live in tests/vectors/test_tpm2_vectors.py; here every marshaller is
driven by hypothesis strategies over the dataclasses, garbage must raise only ParseError, the
hostile cases are named one by one, and signatures made by ``cryptography`` keys cover curves,
hashes and padding the swtpm vectors do not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence._algorithms import HASH_ALG_IDS, HASH_ALGS
from evidence.errors import (
    ParseError,
    SignatureError,
    TruncatedError,
    UnsupportedError,
    VerificationError,
)
from evidence.tpm2 import (
    TPM2B_MAX_SIZES,
    TPM_GENERATED_VALUE,
    TpmAlgId,
    TpmaObject,
    TpmEccCurve,
    TpmlPcrSelection,
    TpmsAttest,
    TpmsCertifyInfo,
    TpmsClockInfo,
    TpmsEccParms,
    TpmsEccPoint,
    TpmsPcrSelection,
    TpmsQuoteInfo,
    TpmsRsaParms,
    TpmsSignatureEcc,
    TpmsSignatureRsa,
    TpmSt,
    TpmtPublic,
    TpmtScheme,
    TpmtSignature,
    TpmtSymDefObject,
    marshal_tpm2b,
    marshal_tpm2b_attest,
    marshal_tpm2b_public,
    object_name,
    public_key,
    quote_pcr_digest,
    unmarshal_tpm2b,
    unmarshal_tpm2b_attest,
    unmarshal_tpm2b_public,
    verify_attest_signature,
    verify_signature,
)

A = TpmAlgId
NULL = A.TPM_ALG_NULL
SHA256 = A.TPM_ALG_SHA256
FAST = settings(max_examples=300, deadline=None)

# ------------------------------------------------------------------------------------------------
# Strategies: one per dataclass, only shapes the spec allows, so marshal ∘ unmarshal is identity

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
hash_algs = st.sampled_from(sorted(HASH_ALGS))


def tpm2b(kind: str) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=TPM2B_MAX_SIZES[kind])


sym_defs = st.one_of(
    st.just(TpmtSymDefObject(NULL)),
    st.builds(
        TpmtSymDefObject,
        st.sampled_from([A.TPM_ALG_AES, A.TPM_ALG_SM4, A.TPM_ALG_CAMELLIA]),
        u16,
        st.sampled_from(
            [A.TPM_ALG_CFB, A.TPM_ALG_CBC, A.TPM_ALG_CTR, A.TPM_ALG_OFB, A.TPM_ALG_ECB, NULL]
        ),
    ),
)
rsa_schemes = st.one_of(
    st.sampled_from([TpmtScheme(NULL), TpmtScheme(A.TPM_ALG_RSAES)]),
    st.builds(
        TpmtScheme, st.sampled_from([A.TPM_ALG_RSASSA, A.TPM_ALG_RSAPSS, A.TPM_ALG_OAEP]), hash_algs
    ),
)
ecc_schemes = st.one_of(
    st.just(TpmtScheme(NULL)),
    st.builds(
        TpmtScheme,
        st.sampled_from(
            [A.TPM_ALG_ECDSA, A.TPM_ALG_SM2, A.TPM_ALG_ECSCHNORR, A.TPM_ALG_ECDH, A.TPM_ALG_ECMQV]
        ),
        hash_algs,
    ),
    st.builds(TpmtScheme, st.just(A.TPM_ALG_ECDAA), hash_algs, u16),
)
kdf_schemes = st.one_of(
    st.just(TpmtScheme(NULL)),
    st.builds(
        TpmtScheme,
        st.sampled_from(
            [A.TPM_ALG_MGF1, A.TPM_ALG_KDF1_SP800_56A, A.TPM_ALG_KDF2, A.TPM_ALG_KDF1_SP800_108]
        ),
        hash_algs,
    ),
)
rsa_parms = st.builds(
    TpmsRsaParms, sym_defs, rsa_schemes, st.sampled_from([1024, 2048, 3072, 4096]), u32
)
ecc_parms = st.builds(
    TpmsEccParms,
    sym_defs,
    ecc_schemes,
    st.sampled_from([c for c in TpmEccCurve if c != TpmEccCurve.TPM_ECC_NONE]),
    kdf_schemes,
)
ecc_points = st.builds(TpmsEccPoint, tpm2b("TPM2B_ECC_PARAMETER"), tpm2b("TPM2B_ECC_PARAMETER"))
name_algs = st.one_of(hash_algs, st.just(NULL))
publics = st.one_of(
    st.builds(
        TpmtPublic, name_algs, u32, tpm2b("TPM2B_DIGEST"), rsa_parms, tpm2b("TPM2B_PUBLIC_KEY_RSA")
    ),
    st.builds(TpmtPublic, name_algs, u32, tpm2b("TPM2B_DIGEST"), ecc_parms, ecc_points),
)
pcr_selections = st.builds(TpmsPcrSelection, hash_algs, st.binary(max_size=32))
pcr_selection_lists = st.builds(TpmlPcrSelection, st.lists(pcr_selections, max_size=16).map(tuple))
clock_infos = st.builds(TpmsClockInfo, u64, u32, u32, st.booleans())
attesteds = st.one_of(
    st.builds(TpmsCertifyInfo, tpm2b("TPM2B_NAME"), tpm2b("TPM2B_NAME")),
    st.builds(TpmsQuoteInfo, pcr_selection_lists, tpm2b("TPM2B_DIGEST")),
)
attests = st.builds(
    TpmsAttest, tpm2b("TPM2B_NAME"), tpm2b("TPM2B_DATA"), clock_infos, u64, attesteds
)
signatures = st.one_of(
    st.builds(
        TpmtSignature,
        st.sampled_from([A.TPM_ALG_RSASSA, A.TPM_ALG_RSAPSS]),
        hash_algs,
        st.builds(TpmsSignatureRsa, tpm2b("TPM2B_PUBLIC_KEY_RSA")),
    ),
    st.builds(
        TpmtSignature,
        st.just(A.TPM_ALG_ECDSA),
        hash_algs,
        st.builds(TpmsSignatureEcc, tpm2b("TPM2B_ECC_PARAMETER"), tpm2b("TPM2B_ECC_PARAMETER")),
    ),
)

# (strategy, unmarshal, marshal) for every top-level marshaller
CODECS: dict[str, tuple[st.SearchStrategy[Any], Callable[[bytes], Any], Callable[[Any], bytes]]] = {
    "TPMT_PUBLIC": (publics, TpmtPublic.unmarshal, TpmtPublic.marshal),
    "TPM2B_PUBLIC": (publics, unmarshal_tpm2b_public, marshal_tpm2b_public),
    "TPMS_ATTEST": (attests, TpmsAttest.unmarshal, TpmsAttest.marshal),
    "TPM2B_ATTEST": (attests, unmarshal_tpm2b_attest, marshal_tpm2b_attest),
    "TPMT_SIGNATURE": (signatures, TpmtSignature.unmarshal, TpmtSignature.marshal),
    "TPML_PCR_SELECTION": (
        pcr_selection_lists,
        TpmlPcrSelection.unmarshal,
        TpmlPcrSelection.marshal,
    ),
}


def _assert_only_parse_error(parse: Callable[[bytes], object], data: bytes) -> None:
    try:
        parse(data)
    except ParseError as err:
        assert 0 <= err.offset <= len(data)
        assert err.expected
        assert err.what


# ------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("codec", sorted(CODECS))
@FAST
@given(data=st.data())
def test_round_trip(codec: str, data: st.DataObject) -> None:
    strategy, unmarshal, marshal = CODECS[codec]
    value = data.draw(strategy)
    encoded = marshal(value)
    assert unmarshal(encoded) == value
    assert marshal(unmarshal(encoded)) == encoded


@pytest.mark.parametrize("kind", sorted(TPM2B_MAX_SIZES))
@settings(max_examples=50, deadline=None)
@given(payload=st.binary(max_size=600))
def test_tpm2b_round_trip(kind: str, payload: bytes) -> None:
    payload = payload[: TPM2B_MAX_SIZES[kind]]
    encoded = marshal_tpm2b(payload, kind)
    assert encoded[:2] == len(payload).to_bytes(2, "big")
    assert unmarshal_tpm2b(encoded, kind) == payload


# ------------------------------------------------------------------------------------------------
# Garbage raises ParseError and nothing else

PARSERS: dict[str, Callable[[bytes], object]] = {
    name: unmarshal for name, (_, unmarshal, _) in CODECS.items()
} | {f"{kind} (bytes)": (lambda d, k=kind: unmarshal_tpm2b(d, k)) for kind in TPM2B_MAX_SIZES}


@pytest.mark.parametrize("parser", sorted(PARSERS))
@FAST
@given(data=st.binary(max_size=700))
def test_inv4_random_bytes_raise_only_parse_error(parser: str, data: bytes) -> None:
    _assert_only_parse_error(PARSERS[parser], data)


@pytest.mark.parametrize("codec", sorted(CODECS))
@FAST
@given(data=st.data())
def test_inv4_mutated_structures_raise_only_parse_error(codec: str, data: st.DataObject) -> None:
    strategy, unmarshal, marshal = CODECS[codec]
    encoded = bytearray(marshal(data.draw(strategy)))
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "byte"]))
    pos = data.draw(st.integers(0, len(encoded)))
    if op == "flip" and pos < len(encoded):
        encoded[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "truncate":
        del encoded[pos:]
    elif op == "insert":
        encoded[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    elif pos < len(encoded):
        encoded[pos] = data.draw(st.sampled_from([0, 0xFF]))
    _assert_only_parse_error(unmarshal, bytes(encoded))


# ------------------------------------------------------------------------------------------------
# Named hostile cases

ECC_AK = TpmtPublic(
    name_alg=SHA256,
    object_attributes=0x00050072,
    auth_policy=b"",
    parameters=TpmsEccParms(
        TpmtSymDefObject(NULL), TpmtScheme(A.TPM_ALG_ECDSA, SHA256), 3, TpmtScheme(NULL)
    ),
    unique=TpmsEccPoint(b"\x11" * 32, b"\x22" * 32),
)
QUOTE = TpmsAttest(
    qualified_signer=b"\x00\x0b" + b"\x33" * 32,
    extra_data=b"nonce",
    clock_info=TpmsClockInfo(1000, 1, 2, True),
    firmware_version=0x0102030405060708,
    attested=TpmsQuoteInfo(
        TpmlPcrSelection((TpmsPcrSelection.from_pcrs(SHA256, [0, 1, 10]),)), b"\x44" * 32
    ),
)
CERTIFY = replace(
    QUOTE, attested=TpmsCertifyInfo(b"\x00\x0b" + b"\x55" * 32, b"\x00\x0b" + b"\x66" * 32)
)


def test_tpm2b_size_larger_than_the_buffer_is_truncated() -> None:
    data = b"\x00\x20" + b"\x00" * 10
    with pytest.raises(TruncatedError) as info:
        unmarshal_tpm2b(data, "TPM2B_DIGEST")
    assert info.value.offset == 2
    assert info.value.expected == "32 bytes"
    assert "10 bytes" in str(info.value)


def test_tpm2b_size_above_the_spec_maximum() -> None:
    with pytest.raises(ParseError, match="at most 64 bytes") as info:
        unmarshal_tpm2b(b"\x00\x41" + b"\x00" * 65, "TPM2B_DIGEST")
    assert info.value.offset == 0
    assert not isinstance(info.value, TruncatedError)


def test_tpm2b_public_claiming_65535_bytes() -> None:
    data = b"\xff\xff" + ECC_AK.marshal()
    with pytest.raises(TruncatedError, match="65535 bytes"):
        unmarshal_tpm2b_public(data)


def test_tpm2b_public_size_longer_than_its_tpmt_public() -> None:
    inner = ECC_AK.marshal() + b"\x00"
    with pytest.raises(ParseError, match=r"TPM2B_PUBLIC\.publicArea.*trailing") as info:
        unmarshal_tpm2b_public(len(inner).to_bytes(2, "big") + inner)
    assert info.value.offset == len(inner) + 1


def test_tpm2b_public_size_shorter_than_its_tpmt_public() -> None:
    inner = ECC_AK.marshal()
    with pytest.raises(TruncatedError):
        unmarshal_tpm2b_public((len(inner) - 1).to_bytes(2, "big") + inner)


def test_unknown_algorithm_is_a_parse_error_not_a_guess() -> None:
    data = b"\x99\x99" + ECC_AK.marshal()[2:]
    with pytest.raises(ParseError, match="unknown algorithm 0x9999") as info:
        TpmtPublic.unmarshal(data)
    assert type(info.value) is ParseError
    assert info.value.what == "TPMT_PUBLIC.type"


def test_known_but_unhandled_object_type_is_unsupported() -> None:
    data = A.TPM_ALG_KEYEDHASH.to_bytes(2, "big") + ECC_AK.marshal()[2:]
    with pytest.raises(UnsupportedError, match="TPM_ALG_KEYEDHASH"):
        TpmtPublic.unmarshal(data)


def test_unknown_name_alg() -> None:
    data = bytearray(ECC_AK.marshal())
    data[2:4] = A.TPM_ALG_SHA3_256.to_bytes(2, "big")
    with pytest.raises(UnsupportedError, match="TPM_ALG_SHA3_256") as info:
        TpmtPublic.unmarshal(bytes(data))
    assert info.value.offset == 2


def test_rsa_key_size_outside_the_spec() -> None:
    pub = TpmtPublic(
        SHA256, 0x40072, b"", TpmsRsaParms(TpmtSymDefObject(NULL), TpmtScheme(NULL), 2048), b""
    )
    data = pub.marshal().replace((2048).to_bytes(2, "big") + b"\x00" * 4, b"\x03\xe8" + b"\x00" * 4)
    with pytest.raises(UnsupportedError, match="keyBits"):
        TpmtPublic.unmarshal(data)


def test_unknown_curve() -> None:
    data = ECC_AK.marshal().replace(b"\x00\x03\x00\x10\x00\x20", b"\x00\x77\x00\x10\x00\x20")
    with pytest.raises(ParseError, match="curveID"):
        TpmtPublic.unmarshal(data)


def test_wrong_magic() -> None:
    data = b"\xff\x54\x43\x48" + QUOTE.marshal()[4:]
    with pytest.raises(ParseError, match="TPM_GENERATED_VALUE 0xff544347, got 0xff544348") as info:
        TpmsAttest.unmarshal(data)
    assert info.value.offset == 0


@pytest.mark.parametrize(
    "st_value",
    [
        TpmSt.TPM_ST_ATTEST_TIME,
        TpmSt.TPM_ST_ATTEST_CREATION,
        TpmSt.TPM_ST_ATTEST_NV,
        TpmSt.TPM_ST_ATTEST_SESSION_AUDIT,
    ],
)
def test_other_attestation_types_are_unsupported(st_value: TpmSt) -> None:
    data = QUOTE.marshal()[:4] + st_value.to_bytes(2, "big") + QUOTE.marshal()[6:]
    with pytest.raises(UnsupportedError, match=st_value.name) as info:
        TpmsAttest.unmarshal(data)
    assert info.value.offset == 4


def test_attest_type_that_is_no_attestation() -> None:
    data = QUOTE.marshal()[:4] + b"\x80\x01" + QUOTE.marshal()[6:]
    with pytest.raises(ParseError, match="TPM_ST_NO_SESSIONS") as info:
        TpmsAttest.unmarshal(data)
    assert not isinstance(info.value, UnsupportedError)


@pytest.mark.parametrize(
    ("structure", "parse"),
    [
        (ECC_AK.marshal(), TpmtPublic.unmarshal),
        (marshal_tpm2b_public(ECC_AK), unmarshal_tpm2b_public),
        (QUOTE.marshal(), TpmsAttest.unmarshal),
        (CERTIFY.marshal(), TpmsAttest.unmarshal),
        (marshal_tpm2b_attest(QUOTE), unmarshal_tpm2b_attest),
        (QUOTE.attested.marshal()[:-34], TpmlPcrSelection.unmarshal),
        (marshal_tpm2b(b"abc", "TPM2B_NAME"), lambda d: unmarshal_tpm2b(d, "TPM2B_NAME")),
    ],
)
def test_trailing_bytes(structure: bytes, parse: Callable[[bytes], object]) -> None:
    parse(structure)
    with pytest.raises(ParseError, match="1 trailing bytes") as info:
        parse(structure + b"\x00")
    assert info.value.offset == len(structure)


def test_pcr_selection_count_of_four_billion() -> None:
    with pytest.raises(ParseError, match="at most 16") as info:
        TpmlPcrSelection.unmarshal(b"\xff\xff\xff\xff")
    assert info.value.what == "TPML_PCR_SELECTION.count"


def test_pcr_select_bitmap_too_large() -> None:
    with pytest.raises(ParseError, match="sizeofSelect"):
        TpmlPcrSelection.unmarshal(b"\x00\x00\x00\x01\x00\x0b\xff" + b"\xff" * 255)


def test_clock_info_safe_must_be_yes_or_no() -> None:
    data = bytearray(QUOTE.marshal())
    safe_at = 6 + 2 + len(QUOTE.qualified_signer) + 2 + len(QUOTE.extra_data) + 16
    assert data[safe_at] == 1
    data[safe_at] = 2
    with pytest.raises(ParseError, match="TPMI_YES_NO") as info:
        TpmsAttest.unmarshal(bytes(data))
    assert info.value.offset == safe_at


@pytest.mark.parametrize(
    "sig_alg", [A.TPM_ALG_HMAC, A.TPM_ALG_ECDAA, A.TPM_ALG_SM2, A.TPM_ALG_ECSCHNORR, NULL]
)
def test_other_signature_algorithms_are_unsupported(sig_alg: TpmAlgId) -> None:
    data = sig_alg.to_bytes(2, "big") + b"\x00\x0b" + b"\x00\x00" * 2
    with pytest.raises(UnsupportedError, match=sig_alg.name):
        TpmtSignature.unmarshal(data)


def test_unknown_signature_algorithm() -> None:
    with pytest.raises(ParseError, match="unknown algorithm 0x0abc"):
        TpmtSignature.unmarshal(b"\x0a\xbc\x00\x0b\x00\x00\x00\x00")


def test_empty_input() -> None:
    for parse in (TpmtPublic.unmarshal, TpmsAttest.unmarshal, TpmtSignature.unmarshal):
        with pytest.raises(TruncatedError) as info:
            parse(b"")
        assert info.value.offset == 0


def test_unmarshal_needs_bytes() -> None:
    with pytest.raises(TypeError):
        TpmsAttest.unmarshal("ff544347")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Constructors refuse shapes that would not round trip


@pytest.mark.parametrize(
    "build",
    [
        lambda: TpmtSymDefObject(NULL, 128, A.TPM_ALG_CFB),
        lambda: TpmtSymDefObject(A.TPM_ALG_AES),
        lambda: TpmtScheme(NULL, SHA256),
        lambda: TpmtScheme(A.TPM_ALG_ECDSA),
        lambda: TpmtScheme(A.TPM_ALG_ECDSA, SHA256, 1),
        lambda: TpmtScheme(A.TPM_ALG_ECDAA, SHA256),
        lambda: TpmtScheme(A.TPM_ALG_RSAES, SHA256),
        lambda: replace(ECC_AK, unique=b"\x00" * 32),
        lambda: replace(ECC_AK, auth_policy=b"\x00" * 65),
        lambda: replace(ECC_AK, object_attributes=-1),
        lambda: TpmtSignature(A.TPM_ALG_ECDSA, SHA256, TpmsSignatureRsa(b"")),
        lambda: TpmtSignature(A.TPM_ALG_HMAC, SHA256, TpmsSignatureRsa(b"")),
        lambda: TpmsClockInfo(2**64, 0, 0, True),
        lambda: TpmsClockInfo(0, 0, 0, 1),  # type: ignore[arg-type]
        lambda: TpmsPcrSelection(SHA256, b"\x00" * 33),
        lambda: TpmlPcrSelection([]),  # type: ignore[arg-type]
        lambda: replace(QUOTE, extra_data=b"\x00" * 67),
        lambda: TpmsPcrSelection.from_pcrs(SHA256, [24]),
        lambda: marshal_tpm2b(b"\x00" * 65, "TPM2B_DIGEST"),
        lambda: unmarshal_tpm2b(b"\x00\x00", "TPM2B_NOPE"),
    ],
)
def test_constructors_reject_misuse(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()


def test_pcr_selection_helpers() -> None:
    selection = TpmsPcrSelection.from_pcrs(SHA256, [10, 0, 23, 1])
    assert selection.pcr_select == b"\x03\x04\x80"
    assert selection.pcrs == (0, 1, 10, 23)
    both = TpmlPcrSelection((selection, TpmsPcrSelection.from_pcrs(A.TPM_ALG_SHA1, [2])))
    assert both.pcrs == ((SHA256, 0), (SHA256, 1), (SHA256, 10), (SHA256, 23), (A.TPM_ALG_SHA1, 2))


def test_attest_type_follows_attested() -> None:
    assert QUOTE.type is TpmSt.TPM_ST_ATTEST_QUOTE
    assert CERTIFY.type is TpmSt.TPM_ST_ATTEST_CERTIFY
    assert QUOTE.marshal()[:6] == TPM_GENERATED_VALUE.to_bytes(4, "big") + b"\x80\x18"


def test_object_attributes_as_flags() -> None:
    flags = ECC_AK.attributes
    assert TpmaObject.RESTRICTED in flags and TpmaObject.SIGN_ENCRYPT in flags
    assert TpmaObject.DECRYPT not in flags
    expected = (
        TpmaObject.FIXEDTPM
        | TpmaObject.FIXEDPARENT
        | TpmaObject.SENSITIVEDATAORIGIN
        | TpmaObject.USERWITHAUTH
        | TpmaObject.RESTRICTED
        | TpmaObject.SIGN_ENCRYPT
    )
    assert flags == expected


def test_hash_table() -> None:
    for alg_id, alg in HASH_ALGS.items():
        assert hashlib.new(alg.hashlib_name).digest_size == alg.digest_size
        assert HASH_ALG_IDS[alg.name] == alg_id
        assert A(alg_id).name.lower().endswith(alg.name.upper().lower())


# ------------------------------------------------------------------------------------------------
# Names, keys, digests

CURVES: dict[int, ec.EllipticCurve] = {
    TpmEccCurve.TPM_ECC_NIST_P256: ec.SECP256R1(),
    TpmEccCurve.TPM_ECC_NIST_P384: ec.SECP384R1(),
    TpmEccCurve.TPM_ECC_NIST_P521: ec.SECP521R1(),
}
EC_KEYS: dict[int, ec.EllipticCurvePrivateKey] = {
    curve: ec.generate_private_key(c) for curve, c in CURVES.items()
}
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_E3 = rsa.generate_private_key(public_exponent=3, key_size=2048)
SIGN_ATTRS = 0x00050072  # fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign


def ecc_public(
    key: ec.EllipticCurvePrivateKey,
    curve_id: int,
    scheme: TpmtScheme | None = None,
    attributes: int = SIGN_ATTRS,
) -> TpmtPublic:
    size = (key.curve.key_size + 7) // 8
    numbers = key.public_key().public_numbers()
    return TpmtPublic(
        SHA256,
        attributes,
        b"",
        TpmsEccParms(
            TpmtSymDefObject(NULL), scheme or TpmtScheme(NULL), curve_id, TpmtScheme(NULL)
        ),
        TpmsEccPoint(numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big")),
    )


def rsa_public(key: rsa.RSAPrivateKey, scheme: TpmtScheme | None = None) -> TpmtPublic:
    numbers = key.public_key().public_numbers()
    exponent = 0 if numbers.e == 65537 else numbers.e
    return TpmtPublic(
        SHA256,
        SIGN_ATTRS,
        b"",
        TpmsRsaParms(TpmtSymDefObject(NULL), scheme or TpmtScheme(NULL), key.key_size, exponent),
        numbers.n.to_bytes(key.key_size // 8, "big"),
    )


def crypto_hash(alg: int) -> hashes.HashAlgorithm:
    table: dict[int, hashes.HashAlgorithm] = {
        A.TPM_ALG_SHA1: hashes.SHA1(),
        A.TPM_ALG_SHA256: hashes.SHA256(),
        A.TPM_ALG_SHA384: hashes.SHA384(),
        A.TPM_ALG_SHA512: hashes.SHA512(),
    }
    return table[alg]


def ecdsa_sign(key: ec.EllipticCurvePrivateKey, data: bytes, hash_alg: int) -> TpmtSignature:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(crypto_hash(hash_alg))))
    size = (key.curve.key_size + 7) // 8
    return TpmtSignature(
        A.TPM_ALG_ECDSA,
        hash_alg,
        TpmsSignatureEcc(r.to_bytes(size, "big"), s.to_bytes(size, "big")),
    )


def rsa_sign(
    key: rsa.RSAPrivateKey, data: bytes, sig_alg: int, hash_alg: int, salt: int = -1
) -> TpmtSignature:
    h = crypto_hash(hash_alg)
    pad: padding.AsymmetricPadding = padding.PKCS1v15()
    if sig_alg == A.TPM_ALG_RSAPSS:
        pad = padding.PSS(padding.MGF1(h), h.digest_size if salt < 0 else salt)
    return TpmtSignature(sig_alg, hash_alg, TpmsSignatureRsa(key.sign(data, pad, h)))


def test_object_name_is_name_alg_and_digest_of_the_public_area() -> None:
    for alg_id, alg in HASH_ALGS.items():
        pub = replace(ECC_AK, name_alg=alg_id)
        name = object_name(pub)
        assert (
            name
            == alg_id.to_bytes(2, "big") + hashlib.new(alg.hashlib_name, pub.marshal()).digest()
        )


def test_object_name_without_name_alg() -> None:
    with pytest.raises(UnsupportedError, match="TPM_ALG_NULL"):
        object_name(replace(ECC_AK, name_alg=NULL))


@pytest.mark.parametrize("curve_id", sorted(CURVES))
def test_public_key_ecc(curve_id: int) -> None:
    key = EC_KEYS[curve_id]
    converted = public_key(ecc_public(key, curve_id))
    assert isinstance(converted, ec.EllipticCurvePublicKey)
    assert converted.public_numbers() == key.public_key().public_numbers()


@pytest.mark.parametrize("key", [RSA_KEY, RSA_KEY_E3])
def test_public_key_rsa(key: rsa.RSAPrivateKey) -> None:
    converted = public_key(rsa_public(key))
    assert isinstance(converted, rsa.RSAPublicKey)
    assert converted.public_numbers() == key.public_key().public_numbers()


def test_public_key_point_off_the_curve() -> None:
    with pytest.raises(ParseError, match="a point on secp256r1") as info:
        public_key(ECC_AK)
    assert info.value.what == "TPMT_PUBLIC.unique.ecc"


def test_public_key_unsupported_curve() -> None:
    assert isinstance(ECC_AK.parameters, TpmsEccParms)
    parameters = replace(ECC_AK.parameters, curve_id=TpmEccCurve.TPM_ECC_BN_P256)
    pub = replace(ECC_AK, parameters=parameters)
    with pytest.raises(UnsupportedError, match="TPM_ECC_NIST_P256"):
        public_key(pub)


def test_public_key_rsa_modulus_shorter_than_key_bits() -> None:
    good = rsa_public(RSA_KEY)
    assert isinstance(good.unique, bytes)
    pub = replace(good, unique=good.unique[1:])
    with pytest.raises(ParseError, match="256-byte modulus"):
        public_key(pub)


def test_quote_pcr_digest() -> None:
    values = [b"\x00" * 32, b"\xaa" * 32, b"\x01" * 20]
    assert quote_pcr_digest(values, SHA256) == hashlib.sha256(b"".join(values)).digest()
    assert quote_pcr_digest(values, A.TPM_ALG_SHA384) == hashlib.sha384(b"".join(values)).digest()
    assert quote_pcr_digest([], SHA256) == hashlib.sha256(b"").digest()
    with pytest.raises(UnsupportedError):
        quote_pcr_digest(values, A.TPM_ALG_SHA3_256)


# ------------------------------------------------------------------------------------------------
# Signatures


@pytest.mark.parametrize("curve_id", sorted(CURVES))
@pytest.mark.parametrize("hash_alg", [A.TPM_ALG_SHA1, SHA256, A.TPM_ALG_SHA384, A.TPM_ALG_SHA512])
def test_ecdsa_attest_signature(curve_id: int, hash_alg: int) -> None:
    key = EC_KEYS[curve_id]
    data = QUOTE.marshal()
    signature = ecdsa_sign(key, data, hash_alg)
    verify_attest_signature(data, signature, ecc_public(key, curve_id))
    with pytest.raises(SignatureError, match="does not verify") as info:
        verify_attest_signature(data[:-1] + b"\x00", signature, ecc_public(key, curve_id))
    assert type(info.value.__cause__).__name__ == "InvalidSignature"


@pytest.mark.parametrize("sig_alg", [A.TPM_ALG_RSASSA, A.TPM_ALG_RSAPSS])
@pytest.mark.parametrize("hash_alg", [A.TPM_ALG_SHA1, SHA256, A.TPM_ALG_SHA384, A.TPM_ALG_SHA512])
def test_rsa_attest_signature(sig_alg: int, hash_alg: int) -> None:
    data = CERTIFY.marshal()
    signature = rsa_sign(RSA_KEY, data, sig_alg, hash_alg)
    verify_attest_signature(data, signature, rsa_public(RSA_KEY))
    with pytest.raises(SignatureError, match=f"{A(sig_alg).name}/{HASH_ALGS[hash_alg].name}"):
        verify_attest_signature(data + b"\x00", signature, rsa_public(RSA_KEY))


@pytest.mark.parametrize("salt", [0, 20, 32, 222])
def test_rsapss_any_salt_length(salt: int) -> None:
    """TPMs differ in the PSS salt length (hash size, or the maximum); both must verify."""
    signature = rsa_sign(RSA_KEY, b"msg", A.TPM_ALG_RSAPSS, SHA256, salt)
    verify_signature(b"msg", signature, rsa_public(RSA_KEY))


def test_signature_scheme_must_match_the_key_type() -> None:
    data = QUOTE.marshal()
    signature = ecdsa_sign(EC_KEYS[TpmEccCurve.TPM_ECC_NIST_P256], data, SHA256)
    with pytest.raises(SignatureError, match="needs a TPM_ALG_ECC key, the signer is TPM_ALG_RSA"):
        verify_attest_signature(data, signature, rsa_public(RSA_KEY))


def test_signature_must_use_the_scheme_the_key_is_fixed_to() -> None:
    key = EC_KEYS[TpmEccCurve.TPM_ECC_NIST_P256]
    signer = ecc_public(key, TpmEccCurve.TPM_ECC_NIST_P256, TpmtScheme(A.TPM_ALG_ECDSA, SHA256))
    data = QUOTE.marshal()
    verify_attest_signature(data, ecdsa_sign(key, data, SHA256), signer)
    with pytest.raises(SignatureError, match=r"fixed to scheme TPM_ALG_ECDSA/sha256.*sha384"):
        verify_attest_signature(data, ecdsa_sign(key, data, A.TPM_ALG_SHA384), signer)


def test_signer_without_the_sign_attribute() -> None:
    key = EC_KEYS[TpmEccCurve.TPM_ECC_NIST_P256]
    signer = ecc_public(key, TpmEccCurve.TPM_ECC_NIST_P256, attributes=0x00030072)
    data = QUOTE.marshal()
    with pytest.raises(SignatureError, match="sign attribute"):
        verify_attest_signature(data, ecdsa_sign(key, data, SHA256), signer)


def test_attestation_by_an_unrestricted_key_is_refused_by_default() -> None:
    """Its holder could TPM2_Sign a forged TPMS_ATTEST; only a restricted key proves the TPM."""
    key = EC_KEYS[TpmEccCurve.TPM_ECC_NIST_P256]
    signer = ecc_public(key, TpmEccCurve.TPM_ECC_NIST_P256, attributes=0x00040072)
    data = QUOTE.marshal()
    signature = ecdsa_sign(key, data, SHA256)
    with pytest.raises(SignatureError, match="allow_unrestricted_signer"):
        verify_attest_signature(data, signature, signer)
    verify_attest_signature(data, signature, signer, allow_unrestricted_signer=True)
    verify_signature(b"message", ecdsa_sign(key, b"message", SHA256), signer)


def test_signature_by_another_key() -> None:
    data = QUOTE.marshal()
    other = ec.generate_private_key(ec.SECP256R1())
    signature = ecdsa_sign(other, data, SHA256)
    with pytest.raises(SignatureError, match="by the key with Name 000b"):
        verify_attest_signature(
            data, signature, ecc_public(EC_KEYS[TpmEccCurve.TPM_ECC_NIST_P256], 3)
        )


def test_verify_signature_refuses_attestation_shaped_messages() -> None:
    key = EC_KEYS[TpmEccCurve.TPM_ECC_NIST_P256]
    data = QUOTE.marshal()
    signature = ecdsa_sign(key, data, SHA256)
    with pytest.raises(SignatureError, match="TPM_GENERATED_VALUE"):
        verify_signature(data, signature, ecc_public(key, 3))
    message = b"vPCR message"
    verify_signature(message, ecdsa_sign(key, message, SHA256), ecc_public(key, 3))


def test_signature_errors_are_verification_errors() -> None:
    assert issubclass(SignatureError, VerificationError)
    key = EC_KEYS[TpmEccCurve.TPM_ECC_NIST_P256]
    signature = ecdsa_sign(key, b"x", SHA256)
    with pytest.raises(TypeError):
        verify_signature("text", signature, ecc_public(key, 3))  # type: ignore[arg-type]

"""Golden TPM 2.0 structures from swtpm + tpm2-tools (tests/vectors/tpm2/, see README.md here).

Each vector is checked against what the independent tools said about it when it was captured
(``expected.json``): decode → the tools' fields, encode → the same bytes, Name → what
``tpm2_readpublic -n`` wrote, and every signature verifies with our code while a one-byte change
makes it fail with SignatureError. The ``check_*`` functions are reused by the sim tier
(tests/sim/test_tpm2_golden_live.py) on structures made live.

Mutations of the same vectors (flips, truncations, insertions) must raise only ParseError.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence._algorithms import HASH_ALG_IDS, HASH_ALGS
from evidence.errors import ParseError, SignatureError
from evidence.tpm2 import (
    TpmAlgId,
    TpmsAttest,
    TpmsCertifyInfo,
    TpmsEccParms,
    TpmsEccPoint,
    TpmsQuoteInfo,
    TpmsSignatureEcc,
    TpmsSignatureRsa,
    TpmSt,
    TpmtPublic,
    TpmtSignature,
    marshal_tpm2b_public,
    object_name,
    public_key,
    quote_pcr_digest,
    unmarshal_tpm2b,
    unmarshal_tpm2b_public,
    verify_attest_signature,
    verify_signature,
)

VECTORS = Path(__file__).resolve().parent / "tpm2"
EXPECTED: dict[str, Any] = json.loads((VECTORS / "expected.json").read_text())
# tpm2_certify 5.4 cannot take qualifying data and always sends these four bytes.
TPM2_TOOLS_CERTIFY_EXTRA_DATA = bytes.fromhex("00ff55aa")
SIG_ALGS = {
    "ecdsa": TpmAlgId.TPM_ALG_ECDSA,
    "rsassa": TpmAlgId.TPM_ALG_RSASSA,
    "rsapss": TpmAlgId.TPM_ALG_RSAPSS,
}


def _raw(field: dict[str, str]) -> int:
    return int(field["raw"], 16)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def load_keys(directory: Path, expected: dict[str, Any]) -> dict[str, TpmtPublic]:
    return {
        key: unmarshal_tpm2b_public((directory / entry["pub"]).read_bytes())
        for key, entry in expected["keys"].items()
    }


# ------------------------------------------------------------------------------------------------
# Checks shared with the sim tier


def check_key(directory: Path, entry: dict[str, Any]) -> None:
    """TPM2B_PUBLIC decodes to tpm2_readpublic's fields, re-encodes identically, Name matches."""
    raw = (directory / entry["pub"]).read_bytes()
    tool = entry["tpm2_readpublic"]
    public = unmarshal_tpm2b_public(raw)
    assert marshal_tpm2b_public(public) == raw
    assert unmarshal_tpm2b(raw, "TPM2B_PUBLIC") == public.marshal()

    assert public.type == _raw(tool["type"])
    assert public.name_alg == _raw(tool["name-alg"])
    assert public.object_attributes == _raw(tool["attributes"])
    assert public.auth_policy.hex() == tool.get("authorization policy", "")
    params = public.parameters
    assert params.symmetric.algorithm == _raw(tool["sym-alg"])
    assert (params.symmetric.mode or 0) == _raw(tool["sym-mode"])
    assert (params.symmetric.key_bits or 0) == int(tool["sym-keybits"])
    assert params.scheme.scheme == _raw(tool["scheme"])
    assert (params.scheme.hash_alg or 0) == _raw(tool["scheme-halg"])

    key = public_key(public)
    if isinstance(params, TpmsEccParms):
        assert isinstance(public.unique, TpmsEccPoint)
        assert params.curve_id == _raw(tool["curve-id"])
        assert params.kdf.scheme == _raw(tool["kdfa-alg"])
        assert (params.kdf.hash_alg or 0) == _raw(tool["kdfa-halg"])
        assert public.unique.x.hex() == tool["x"]
        assert public.unique.y.hex() == tool["y"]
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert key.public_numbers().x == int(tool["x"], 16)
        assert key.public_numbers().y == int(tool["y"], 16)
    else:
        assert isinstance(public.unique, bytes)
        assert params.key_bits == int(tool["bits"])
        assert (params.exponent or 65537) == int(tool["exponent"])
        assert public.unique.hex() == tool["rsa"]
        assert isinstance(key, rsa.RSAPublicKey)
        assert key.public_numbers().n == int(tool["rsa"], 16)

    name = object_name(public)
    assert name == (directory / entry["name"]).read_bytes()
    assert name.hex() == tool["name"]


def _check_signature_bytes(raw: bytes) -> TpmtSignature:
    signature = TpmtSignature.unmarshal(raw)
    assert signature.marshal() == raw
    return signature


def _check_flips_fail(
    data: bytes, verify: Callable[[bytes], None], positions: tuple[int, ...] | None = None
) -> None:
    for index in positions or (0, len(data) // 2, len(data) - 1):
        with pytest.raises(SignatureError) as info:
            verify(_flip(data, index))
        assert "expected" in str(info.value)
        assert info.value.__cause__ is not None


def _check_attest_common(
    attest: TpmsAttest, tool: dict[str, Any], *, firmware_byte_swapped: bool = False
) -> None:
    assert int(tool["magic"], 16) == 0xFF544347
    assert attest.type == int(tool["type"], 16)
    assert attest.qualified_signer.hex() == tool["qualifiedSigner"]
    assert attest.extra_data.hex() == tool["extraData"]
    assert attest.clock_info.clock == int(tool["clockInfo"]["clock"])
    assert attest.clock_info.reset_count == int(tool["clockInfo"]["resetCount"])
    assert attest.clock_info.restart_count == int(tool["clockInfo"]["restartCount"])
    assert attest.clock_info.safe == bool(int(tool["clockInfo"]["safe"]))
    firmware = bytes.fromhex(tool["firmwareVersion"])
    if firmware_byte_swapped:
        # tpm2_print (tpm2-tools 5.4) prints the UINT64 firmwareVersion in host (little-endian)
        # byte order, unlike every other field; the bytes on the wire are big-endian.
        firmware = firmware[::-1]
    assert attest.firmware_version == int.from_bytes(firmware, "big")


def check_quote(directory: Path, entry: dict[str, Any], expected: dict[str, Any]) -> None:
    """A tpm2_quote output decodes to tpm2_print's fields; its PCR digest and signature hold."""
    keys = load_keys(directory, expected)
    signer = keys[entry["signer"]]
    attest_bytes = (directory / entry["attest"]).read_bytes()
    attest = TpmsAttest.unmarshal(attest_bytes)
    assert attest.marshal() == attest_bytes
    printed = entry["tpm2_print"]
    _check_attest_common(attest, printed, firmware_byte_swapped=True)
    assert attest.type == TpmSt.TPM_ST_ATTEST_QUOTE
    assert isinstance(attest.attested, TpmsQuoteInfo)
    assert attest.extra_data.hex() == entry["nonce"]
    assert (
        attest.qualified_signer.hex()
        == expected["keys"][entry["signer"]]["tpm2_readpublic"]["qualified name"]
    )

    tool_quote = printed["attested"]["quote"]
    selections = attest.attested.pcr_select.selections
    assert len(selections) == int(tool_quote["pcrSelect"]["count"])
    for i, selection in enumerate(selections):
        tool_sel = tool_quote["pcrSelect"]["pcrSelections"][str(i)]
        assert selection.hash_alg == int(tool_sel["hash"].split()[0])
        assert len(selection.pcr_select) == int(tool_sel["sizeofSelect"])
        assert selection.pcr_select.hex() == tool_sel["pcrSelect"]
    assert attest.attested.pcr_digest.hex() == tool_quote["pcrDigest"]

    # The PCR values tpm2_quote read, in selection order, digest to pcrDigest.
    raw_values = (directory / entry["pcrs"]).read_bytes()
    values, offset = [], 0
    tool_pcrs = entry["tpm2_quote"]["pcrs"]
    for hash_alg, pcr in attest.attested.pcr_select.pcrs:
        size = HASH_ALGS[hash_alg].digest_size
        value = raw_values[offset : offset + size]
        offset += size
        assert value == bytes.fromhex(tool_pcrs[HASH_ALGS[hash_alg].name][str(pcr)][2:])
        values.append(value)
    assert offset == len(raw_values)

    signature = _check_signature_bytes((directory / entry["sig"]).read_bytes())
    digest = quote_pcr_digest(values, signature.hash_alg)
    assert digest == attest.attested.pcr_digest
    assert digest.hex() == entry["tpm2_quote"]["calcDigest"]

    # The signature as tpm2_quote printed it (DER for ECDSA, the raw block for RSA).
    tool_sig = entry["tpm2_quote"]["signature"]
    assert signature.sig_alg == SIG_ALGS[tool_sig["alg"]]
    if isinstance(signature.signature, TpmsSignatureEcc):
        der = encode_dss_signature(
            int.from_bytes(signature.signature.signature_r, "big"),
            int.from_bytes(signature.signature.signature_s, "big"),
        )
        assert der.hex() == tool_sig["sig"]
    else:
        assert isinstance(signature.signature, TpmsSignatureRsa)
        assert signature.signature.sig.hex() == tool_sig["sig"]

    verify_attest_signature(attest_bytes, signature, signer)
    _check_flips_fail(attest_bytes, lambda data: verify_attest_signature(data, signature, signer))


def check_certify(directory: Path, entry: dict[str, Any], expected: dict[str, Any]) -> None:
    """A TPM2_Certify output names the certified key and verifies under the signer."""
    keys = load_keys(directory, expected)
    signer = keys[entry["signer"]]
    certified = keys[entry["certified"]]
    attest_bytes = (directory / entry["attest"]).read_bytes()
    attest = TpmsAttest.unmarshal(attest_bytes)
    assert attest.marshal() == attest_bytes
    view = entry["tpm2_pytss"]
    _check_attest_common(attest, view)
    assert attest.type == TpmSt.TPM_ST_ATTEST_CERTIFY
    assert isinstance(attest.attested, TpmsCertifyInfo)
    assert attest.attested.name.hex() == view["attested"]["certify"]["name"]
    assert attest.attested.qualified_name.hex() == view["attested"]["certify"]["qualifiedName"]

    certified_tool = expected["keys"][entry["certified"]]["tpm2_readpublic"]
    signer_tool = expected["keys"][entry["signer"]]["tpm2_readpublic"]
    assert attest.attested.name == object_name(certified)
    assert attest.attested.qualified_name.hex() == certified_tool["qualified name"]
    assert attest.qualified_signer.hex() == signer_tool["qualified name"]
    if "qualifying_data" in entry:
        assert attest.extra_data.hex() == entry["qualifying_data"]
    else:
        assert attest.extra_data == TPM2_TOOLS_CERTIFY_EXTRA_DATA

    signature = _check_signature_bytes((directory / entry["sig"]).read_bytes())
    verify_attest_signature(attest_bytes, signature, signer)
    _check_flips_fail(attest_bytes, lambda data: verify_attest_signature(data, signature, signer))
    with pytest.raises(SignatureError):
        verify_attest_signature(attest_bytes, signature, certified)


def check_sign(directory: Path, entry: dict[str, Any], expected: dict[str, Any]) -> None:
    """A tpm2_sign signature over a message verifies with verify_signature, and only there."""
    keys = load_keys(directory, expected)
    signer = keys[entry["signer"]]
    message = (directory / entry["message"]).read_bytes()
    signature = _check_signature_bytes((directory / entry["sig"]).read_bytes())
    assert signature.sig_alg == SIG_ALGS[entry["scheme"]]
    assert signature.hash_alg == HASH_ALG_IDS[entry["hash"]]
    verify_signature(message, signature, signer)
    _check_flips_fail(message, lambda data: verify_signature(data, signature, signer))
    others = [k for name, k in keys.items() if name != entry["signer"] and k.type == signer.type]
    for other in others:
        with pytest.raises(SignatureError):
            verify_signature(message, signature, other)


# ------------------------------------------------------------------------------------------------
# The golden vectors


def test_vectors_cover_the_issue() -> None:
    """ECC P-256 and RSA-2048 keys; ECDSA, RSASSA and RSAPSS; certify and quote."""
    types = {k.type for k in load_keys(VECTORS, EXPECTED).values()}
    assert types == {TpmAlgId.TPM_ALG_ECC, TpmAlgId.TPM_ALG_RSA}
    sig_algs = set()
    for group in ("quotes", "certifies", "signs"):
        for entry in EXPECTED[group].values():
            sig_algs.add(TpmtSignature.unmarshal((VECTORS / entry["sig"]).read_bytes()).sig_alg)
    assert sig_algs == set(SIG_ALGS.values())
    assert any("qualifying_data" in e for e in EXPECTED["certifies"].values())


@pytest.mark.parametrize("key", sorted(EXPECTED["keys"]))
def test_key_vector(key: str) -> None:
    check_key(VECTORS, EXPECTED["keys"][key])


@pytest.mark.parametrize("name", sorted(EXPECTED["quotes"]))
def test_quote_vector(name: str) -> None:
    check_quote(VECTORS, EXPECTED["quotes"][name], EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED["certifies"]))
def test_certify_vector(name: str) -> None:
    check_certify(VECTORS, EXPECTED["certifies"][name], EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED["signs"]))
def test_sign_vector(name: str) -> None:
    check_sign(VECTORS, EXPECTED["signs"][name], EXPECTED)


def test_quote_signature_does_not_pass_as_a_tpm2_sign_message() -> None:
    """An attestation is never accepted as a general TPM2_Sign message (domain separation)."""
    entry = EXPECTED["quotes"]["quote_ecc"]
    attest = (VECTORS / entry["attest"]).read_bytes()
    signature = TpmtSignature.unmarshal((VECTORS / entry["sig"]).read_bytes())
    signer = load_keys(VECTORS, EXPECTED)[entry["signer"]]
    with pytest.raises(SignatureError, match="TPM_GENERATED_VALUE"):
        verify_signature(attest, signature, signer)


# ------------------------------------------------------------------------------------------------
# Mutated vectors raise ParseError and nothing else

PARSERS: dict[str, Callable[[bytes], object]] = {
    "pub": unmarshal_tpm2b_public,
    "attest": TpmsAttest.unmarshal,
    "sig": TpmtSignature.unmarshal,
}
GOLDEN = sorted(
    (suffix, path.read_bytes()) for suffix in PARSERS for path in VECTORS.glob(f"*.{suffix}")
)


def _parse_or_parse_error(suffix: str, data: bytes) -> None:
    try:
        PARSERS[suffix](data)
    except ParseError as err:
        assert err.offset >= 0 and err.expected
        assert err.offset <= len(data)


@st.composite
def _mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix, data = draw(st.sampled_from(GOLDEN))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[pos : pos + draw(st.integers(1, 8))]
        elif op == "set" and buf:
            buf[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
    return suffix, bytes(buf)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_inv4_mutated_vectors_raise_only_parse_error(case: tuple[str, bytes]) -> None:
    _parse_or_parse_error(*case)


@pytest.mark.parametrize(("suffix", "data"), GOLDEN, ids=[f"{s}-{len(d)}" for s, d in GOLDEN])
def test_inv4_every_truncation_of_a_vector_is_a_parse_error(suffix: str, data: bytes) -> None:
    for end in range(len(data)):
        with pytest.raises(ParseError):
            PARSERS[suffix](data[:end])
    with pytest.raises(ParseError, match="trailing"):
        PARSERS[suffix](data + b"\x00")

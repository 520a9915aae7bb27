"""IMA measurement lists: generated lists for every template and rule, and named hostile inputs.

Expected values here are computed by hand from the kernel's rules (protocols.md §6.2), with
``struct`` and ``hashlib`` directly, not with the code under test.
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from evidence.errors import (
    HashAlgorithmNotAllowed,
    ParseError,
    ReplayError,
    TruncatedError,
    UnsupportedError,
)
from evidence.ima import (
    ImaEntry,
    KernelRule,
    encode_ascii,
    encode_binary,
    parse_ima_list,
    replay_ima,
    replay_ima_pcr10,
)


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def sha1(b: bytes) -> bytes:
    return hashlib.sha1(b).digest()


def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


FILE_DIGEST = sha256(b"file contents")
# signature_v2_hdr (ima-evm-utils imaevm.h): type 3, version 2, hash algo 4 (sha256), keyid,
# u16be size, signature bytes
SIG = bytes([3, 2, 4]) + bytes.fromhex("c0ffee01") + struct.pack(">H", 8) + bytes(range(8))


def ng_fields(name: bytes, extra: bytes | None = None) -> tuple[bytes, ...]:
    d = b"sha256:\0" + FILE_DIGEST
    base = (d, name + b"\0")
    return base if extra is None else (*base, extra)


def td_of(fields: tuple[bytes, ...]) -> bytes:
    return b"".join(u32(len(f)) + f for f in fields)


def entry(template: str, fields: tuple[bytes, ...], pcr: int = 10) -> ImaEntry:
    if template == "ima":
        th = sha1(fields[0] + fields[1].ljust(256, b"\0"))
    else:
        th = sha1(td_of(fields))
    return ImaEntry(pcr, th, template, fields)


def violation(template: str = "ima-ng", name: bytes = b"/tmp/v") -> ImaEntry:
    if template == "ima":
        return ImaEntry(10, bytes(20), "ima", (bytes(20), name + b"\0"))
    return ImaEntry(10, bytes(20), template, (b"sha256:\0" + bytes(32), name + b"\0"))


LEGACY = entry("ima", (sha1(b"x"), b"/bin/legacy\0"))
NG = entry("ima-ng", ng_fields(b"/usr/bin/true"))
SIGNED = entry("ima-sig", ng_fields(b"/usr/bin/signed", SIG))
UNSIGNED = entry("ima-sig", ng_fields(b"/usr/bin/unsigned", b""))
BUF = entry("ima-buf", ng_fields(b"kernel_version", b"6.1.0"))
VIOLATION = violation()
ALL = [LEGACY, NG, SIGNED, UNSIGNED, BUF, VIOLATION]


# --- hand-built bytes ---------------------------------------------------------------------------


def test_binary_layout_of_ima_ng_entry_by_hand() -> None:
    fields = ng_fields(b"/usr/bin/true")
    td = td_of(fields)
    expected = u32(10) + sha1(td) + u32(6) + b"ima-ng" + u32(len(td)) + td
    assert encode_binary([NG]) == expected
    assert parse_ima_list(expected).entries == (NG,)


def test_binary_layout_of_legacy_ima_entry_by_hand() -> None:
    d = sha1(b"x")
    expected = u32(10) + sha1(d + b"/bin/legacy".ljust(256, b"\0")) + u32(3) + b"ima" + d
    expected += u32(11) + b"/bin/legacy"
    assert encode_binary([LEGACY]) == expected
    raw = parse_ima_list(expected)
    assert raw.entries[0].name == b"/bin/legacy" and raw.entries[0].template_hash_ok()


def test_ascii_layout_by_hand() -> None:
    text = encode_ascii([NG, UNSIGNED, BUF, LEGACY]).decode()
    lines = text.splitlines(keepends=True)
    assert (
        lines[0] == f"10 {NG.template_hash.hex()} ima-ng sha256:{FILE_DIGEST.hex()} /usr/bin/true\n"
    )
    # ima-sig with no signature keeps the separator before the empty field
    assert lines[1].endswith(" /usr/bin/unsigned \n")
    assert lines[2].endswith(" kernel_version " + b"6.1.0".hex() + "\n")
    assert lines[3] == f"10 {LEGACY.template_hash.hex()} ima {sha1(b'x').hex()} /bin/legacy\n"


def test_pcr_below_10_is_padded_in_ascii() -> None:
    e = entry("ima-ng", ng_fields(b"/x"), pcr=9)
    text = encode_ascii([e])
    assert text.startswith(b" 9 ")
    assert parse_ima_list(text).entries == (ImaEntry(9, e.template_hash, "ima-ng", e.fields, 1),)


# --- replay under both rules, every template ------------------------------------------------


def expected_pcr10(entries: list[ImaEntry], bank: str, rule: str) -> bytes:
    h = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}[bank]
    size = h().digest_size
    pcr = bytes(size)
    for e in entries:
        if e.pcr != 10:
            continue
        if e.is_violation:
            digest = b"\xff" * size if rule == "5.8" else (b"\xff" * 20).ljust(size, b"\0")
        elif rule == "5.8":
            data = (
                e.fields[0] + e.fields[1].ljust(256, b"\0")
                if e.template_name == "ima"
                else td_of(e.fields)
            )
            digest = h(data).digest()
        else:
            digest = e.template_hash.ljust(size, b"\0")
        pcr = h(pcr + digest).digest()
    return pcr


@pytest.mark.parametrize("rule", ["5.8", "pre-5.8"])
@pytest.mark.parametrize("fmt", ["binary", "ascii"])
@pytest.mark.parametrize("template", ["ima", "ima-ng", "ima-sig", "ima-buf", "mixed"])
def test_generated_list_replays(rule: str, fmt: str, template: str) -> None:
    entries = ALL if template == "mixed" else [e for e in ALL if e.template_name == template]
    entries = [*entries, violation("ima" if template == "ima" else "ima-ng")]
    data = encode_binary(entries) if fmt == "binary" else encode_ascii(entries)
    raw = parse_ima_list(data)
    assert raw.format == fmt
    result = replay_ima_pcr10(raw, rule)
    assert result.rule == KernelRule(rule)
    assert result.entries == result.replayed == len(entries)
    assert result.violations == sum(e.is_violation for e in entries)
    assert result.template_hash_mismatches == 0
    for bank in ("sha1", "sha256"):
        assert result.pcr10[bank] == expected_pcr10(entries, bank, rule)
    verified = replay_ima(raw, result.pcr10, rule, allow_sha1=rule == "pre-5.8")
    assert [v.name for v in verified.entries] == [e.name for e in entries]


def test_rules_agree_on_sha1_and_differ_on_sha256() -> None:
    raw = parse_ima_list(encode_binary([NG]))
    new, old = replay_ima_pcr10(raw, "5.8"), replay_ima_pcr10(raw, "pre-5.8")
    assert new.pcr10["sha1"] == old.pcr10["sha1"]
    assert new.pcr10["sha256"] == sha256(bytes(32) + sha256(td_of(NG.fields)))
    assert old.pcr10["sha256"] == sha256(bytes(32) + NG.template_hash + bytes(12))


def test_violation_extends_ff_and_skips_the_template_hash_check() -> None:
    raw = parse_ima_list(encode_ascii([VIOLATION]))
    result = replay_ima_pcr10(raw)
    assert result.violations == 1 and result.template_hash_mismatches == 0
    assert result.pcr10["sha1"] == sha1(bytes(20) + b"\xff" * 20)
    assert result.pcr10["sha256"] == sha256(bytes(32) + b"\xff" * 32)


def test_pre_5_8_violation_is_20_ff_bytes_zero_padded() -> None:
    result = replay_ima_pcr10(parse_ima_list(encode_ascii([VIOLATION])), "pre-5.8")
    assert result.pcr10["sha1"] == sha1(bytes(20) + b"\xff" * 20)
    assert result.pcr10["sha256"] == sha256(bytes(32) + b"\xff" * 20 + bytes(12))


def test_pre_5_19_violation_with_a_20_byte_zero_sha256_digest_parses() -> None:
    e = ImaEntry(10, bytes(20), "ima-ng", (b"sha256:\0" + bytes(20), b"/v\0"))
    assert parse_ima_list(encode_ascii([e])).entries[0].fields == e.fields


def test_entries_for_other_pcrs_are_not_replayed_into_pcr10() -> None:
    other = entry("ima-ng", ng_fields(b"/other"), pcr=11)
    raw = parse_ima_list(encode_binary([NG, other]))
    result = replay_ima_pcr10(raw)
    assert result.entries == 2 and result.replayed == 1
    assert result.pcr10 == replay_ima_pcr10(parse_ima_list(encode_binary([NG]))).pcr10
    verified = replay_ima(raw, result.pcr10)
    assert verified.untrusted_other_pcr_entries == 1 and len(verified.entries) == 1


def test_kernel_hashless_banks_extend_the_padded_sha1_template_hash() -> None:
    raw = parse_ima_list(encode_binary([NG, VIOLATION]))
    result = replay_ima_pcr10(raw, "5.8", ("sha384",), kernel_hashless_banks=("sha384",))
    step = hashlib.sha384(bytes(48) + NG.template_hash + bytes(28)).digest()
    assert result.pcr10["sha384"] == hashlib.sha384(step + b"\xff" * 48).digest()


def test_template_hash_mismatch_is_counted_and_refused_by_replay_ima() -> None:
    forged = ImaEntry(10, sha1(b"not it"), "ima-ng", NG.fields)
    raw = parse_ima_list(encode_binary([NG, forged]))
    result = replay_ima_pcr10(raw)
    assert result.template_hash_mismatches == 1 and result.mismatched == (1,)
    with pytest.raises(ReplayError, match="wrong template hash") as err:
        replay_ima(raw, result.pcr10)
    assert err.value.invalid_pcrs == (10,)


def test_replay_ima_names_the_bank_that_differs() -> None:
    raw = parse_ima_list(encode_binary([NG]))
    good = replay_ima_pcr10(raw).pcr10
    with pytest.raises(ReplayError, match="sha256: expected 00") as err:
        replay_ima(raw, {"sha1": good["sha1"], "sha256": bytes(32)})
    assert err.value.invalid_pcrs == (10,)


def test_sha1_only_binding_needs_allow_sha1_but_only_when_it_would_verify() -> None:
    raw = parse_ima_list(encode_binary([NG]))
    good = replay_ima_pcr10(raw, "5.8")
    with pytest.raises(HashAlgorithmNotAllowed):
        replay_ima(raw, {"sha1": good.pcr10["sha1"]})
    assert replay_ima(raw, {"sha1": good.pcr10["sha1"]}, allow_sha1=True).entries
    with pytest.raises(ReplayError):  # wrong value: the replay error, not the SHA-1 one
        replay_ima(raw, {"sha1": bytes(20)})
    old = replay_ima_pcr10(raw, "pre-5.8")
    with pytest.raises(HashAlgorithmNotAllowed):
        replay_ima(raw, old.pcr10, "pre-5.8")
    assert replay_ima(raw, old.pcr10, "pre-5.8", allow_sha1=True).rule is KernelRule.PRE_5_8


def test_replay_ima_rejects_misuse() -> None:
    raw = parse_ima_list(b"")
    with pytest.raises(ValueError):
        replay_ima(raw, {})
    with pytest.raises(ValueError):
        replay_ima(raw, {"md5": bytes(16)})
    with pytest.raises(ValueError):
        replay_ima(raw, {"sha256": bytes(20)})
    with pytest.raises(ValueError):
        replay_ima_pcr10(raw, "4.19")
    with pytest.raises(TypeError):
        parse_ima_list("10 abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        parse_ima_list(b"", "json")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        replay_ima_pcr10(raw, banks=())


def test_empty_list_replays_to_zero() -> None:
    result = replay_ima_pcr10(parse_ima_list(b""))
    assert result.entries == 0 and result.pcr10["sha256"] == bytes(32)


# --- unsupported templates --------------------------------------------------------------------


@pytest.mark.parametrize("template", ["ima-ngv2", "ima-sigv2", "ima-modsig", "evm-sig", "mine"])
def test_unsupported_template_is_listed_but_never_replayed_binary(template: str) -> None:
    td = td_of((b"ima:sha256:\0" + FILE_DIGEST, b"/x\0"))
    name = template.encode()
    data = encode_binary([NG]) + u32(10) + sha1(td) + u32(len(name)) + name + u32(len(td)) + td
    raw = parse_ima_list(data)
    assert [e.supported for e in raw.entries] == [True, False]
    assert raw.entries[1].template_name == template and raw.entries[1].fields == ()
    with pytest.raises(UnsupportedError, match=template) as err:
        replay_ima_pcr10(raw)
    assert err.value.offset == len(encode_binary([NG])) and err.value.unit == "offset"
    with pytest.raises(ValueError):
        encode_binary(raw.entries)


def test_unsupported_template_is_listed_but_never_replayed_ascii() -> None:
    line = f"10 {'ab' * 20} ima-ngv2 ima:sha256:{FILE_DIGEST.hex()} /x\n".encode()
    raw = parse_ima_list(encode_ascii([NG]) + line)
    assert not raw.entries[1].supported
    with pytest.raises(UnsupportedError) as err:
        replay_ima(raw, {"sha256": bytes(32)})
    assert err.value.offset == 2 and err.value.unit == "line"


# --- truncation ---------------------------------------------------------------------------------


def test_truncated_binary_tail_is_reported_and_not_replayed() -> None:
    full = encode_binary([NG, SIGNED])
    raw = parse_ima_list(full[:-5])
    assert raw.truncated_tail and raw.truncated_at == len(encode_binary([NG]))
    assert raw.entries == parse_ima_list(encode_binary([NG])).entries
    result = replay_ima_pcr10(raw)
    assert result.truncated_tail
    assert result.pcr10 == replay_ima_pcr10(parse_ima_list(encode_binary([NG]))).pcr10


def test_truncated_ascii_tail_is_the_line_without_newline() -> None:
    full = encode_ascii([NG, SIGNED])
    raw = parse_ima_list(full[:-1])  # only the newline missing: still dropped
    assert raw.truncated_tail and raw.truncated_at == 2 and len(raw.entries) == 1


# --- named hostile inputs -----------------------------------------------------------------------


def _head(template: bytes = b"ima-ng", pcr: int = 10) -> bytes:
    return u32(pcr) + bytes(range(1, 21)) + u32(len(template)) + template


def _hostile_binary(case: str) -> tuple[bytes, int]:
    """(input, offset the ParseError must name)."""
    good = encode_binary([NG])
    n = len(good)
    td = td_of(ng_fields(b"/x"))
    if case == "template name length 3 GB":
        return good + u32(10) + bytes(20) + u32(3 * 2**30), n + 24
    if case == "template data length 3 GB":
        return good + _head() + u32(3 * 2**30) + td, n + 34
    if case == "template data length past the end, disagreeing with its fields":
        return good + _head() + u32(len(td) + 1000) + td, n + 34
    if case == "field length past the template data":
        bad = u32(2000) + td[4:]
        return good + _head() + u32(len(bad)) + bad, n + 38
    if case == "template data longer than its fields":
        return good + _head() + u32(len(td) + 3) + td + b"xyz", n + 38 + len(td)
    if case == "pcr index 4 billion":
        return good + u32(0xFFFFFFFF) + bytes(20), n
    if case == "template name with a NUL":
        return good + _head(b"ima\0ng"), n + 28
    if case == "zero-length template name":
        return good + u32(10) + bytes(20) + u32(0), n + 24
    if case == "d-ng without algo separator":
        bad = td_of((FILE_DIGEST, b"/x\0"))
        return good + _head() + u32(len(bad)) + bad, n + 38
    if case == "n-ng without NUL":
        bad = td_of((b"sha256:\0" + FILE_DIGEST, b"/x"))
        return good + _head() + u32(len(bad)) + bad, n + 38
    if case == "sha256 digest of 31 bytes":
        bad = td_of((b"sha256:\0" + FILE_DIGEST[:31], b"/x\0"))
        return good + _head() + u32(len(bad)) + bad, n + 38
    if case == "legacy ima name of 300 bytes":
        return good + _head(b"ima") + bytes(20) + u32(300) + b"a" * 300, n + 51
    raise AssertionError(case)


BINARY_CASES = [
    "template name length 3 GB",
    "template data length 3 GB",
    "template data length past the end, disagreeing with its fields",
    "field length past the template data",
    "template data longer than its fields",
    "pcr index 4 billion",
    "template name with a NUL",
    "zero-length template name",
    "d-ng without algo separator",
    "n-ng without NUL",
    "sha256 digest of 31 bytes",
    "legacy ima name of 300 bytes",
]


@pytest.mark.parametrize("case", BINARY_CASES)
def test_hostile_binary(case: str) -> None:
    data, offset = _hostile_binary(case)
    with pytest.raises(ParseError) as err:
        parse_ima_list(data, "binary")
    assert not isinstance(err.value, TruncatedError), "must not pass for a truncated tail"
    assert err.value.unit == "offset"
    assert err.value.offset == offset, str(err.value)


def _hostile_ascii(case: str) -> tuple[bytes, int]:
    good = encode_ascii([NG, SIGNED])  # lines 1-2; the hostile line is 3
    th = NG.template_hash.hex()
    d = f"sha256:{FILE_DIGEST.hex()}"
    lines = {
        "non-hex sig field": f"10 {th} ima-sig {d} /x zz12\n",
        "non-hex digest": f"10 {th} ima-ng sha256:{'g' * 64} /x\n",
        "odd-length hex": f"10 {th} ima-buf {d} /x abc\n",
        "short template hash": f"10 {th[:38]} ima-ng {d} /x\n",
        "non-hex template hash": f"10 {'x' * 40} ima-ng {d} /x\n",
        "pcr not a number": f"1x {th} ima-ng {d} /x\n",
        "pcr 99": f"99 {th} ima-ng {d} /x\n",
        "too few fields": f"10 {th} ima-sig {d} /x\n",
        "too many fields": f"10 {th} ima-ng {d} /x extra\n",
        "d-ng without colon": f"10 {th} ima-ng {FILE_DIGEST.hex()} /x\n",
        "empty name": f"10 {th} ima-ng {d} \n",
        "wrong digest size": f"10 {th} ima-ng sha1:{FILE_DIGEST.hex()} /x\n",
        "empty line": "\n",
        "two spaces": f"10 {th}  ima-ng {d} /x\n",
        "legacy d of 19 bytes": f"10 {th} ima {'00' * 19} /x\n",
    }
    return good + lines[case].encode(), 3


ASCII_CASES = [
    "non-hex sig field",
    "non-hex digest",
    "odd-length hex",
    "short template hash",
    "non-hex template hash",
    "pcr not a number",
    "pcr 99",
    "too few fields",
    "too many fields",
    "d-ng without colon",
    "empty name",
    "wrong digest size",
    "empty line",
    "two spaces",
    "legacy d of 19 bytes",
]


@pytest.mark.parametrize("case", ASCII_CASES)
def test_hostile_ascii(case: str) -> None:
    data, line = _hostile_ascii(case)
    with pytest.raises(ParseError) as err:
        parse_ima_list(data)
    assert err.value.unit == "line" and err.value.offset == line, str(err.value)
    assert f"line {line}" in str(err.value)


def test_garbage_in_an_unterminated_last_line_is_not_a_truncated_tail() -> None:
    with pytest.raises(ParseError):
        parse_ima_list(encode_ascii([NG]) + b"xx yy")


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        ImaEntry(10, bytes(19), "ima-ng", NG.fields)
    with pytest.raises(ValueError):
        ImaEntry(10, NG.template_hash, "ima-ng", NG.fields[:1])
    with pytest.raises(ValueError):
        ImaEntry(24, NG.template_hash, "ima-ng", NG.fields)
    with pytest.raises(ValueError):
        ImaEntry(10, NG.template_hash, "ima-ngv2", NG.fields)
    with pytest.raises(ValueError):
        encode_ascii([entry("ima-ng", ng_fields(b"/with space"))])

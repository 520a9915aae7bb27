"""The fast (columnar) IMA path against the general one: same values, same errors, same findings.

``parse_ima_list`` on a binary list keeps columns (the fast path, ``evidence/_ima_fastpath.py``); a
``RawImaList`` built from entries, and ``ima._parse_binary``, go entry by entry (the general
path). Each property here runs both on the same random valid or mutated list and compares
everything they return or raise. ``evidence.policy`` evaluates a columnar ``VerifiedImaList``
through a candidate filter and one built from entries by looking at every entry; the findings
must be the same.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import hashlib
import pickle
import secrets
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from evidence import bundle as bundle_module
from evidence import ima
from evidence import policy as policy_module
from evidence.errors import ParseError, VtpmError
from evidence.ima import (
    ImaEntry,
    KernelRule,
    RawImaList,
    VerifiedImaList,
    encode_ascii,
    encode_binary,
    parse_ima_list,
    replay_ima,
    replay_ima_pcr10,
    signed_prefix,
)
from evidence.policy import ImaAllowlist, ReferenceValues, evaluate_reference_values
from evidence.verify import AttestedVm, verify_bundle
from tests.helpers.evidence_factory import default_world

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI load

ALGOS = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "md5": 16, "sm3": 32}
# a few names only, so allowlists and lists share paths; some are not UTF-8
NAMES = st.sampled_from(
    [b"/usr/bin/a", b"/usr/bin/b", b"/etc/c", b"boot_aggregate", b"/tmp/\xff\xfe", b"/x\xe2\x82"]
) | st.binary(min_size=1, max_size=12).map(
    lambda b: b.replace(b" ", b"_").replace(b"\0", b"@").replace(b"\n", b"#")
)
DIGESTS = st.sampled_from([b"\x11" * 32, b"\x22" * 32, b"\x33" * 20])


def _td(fields: tuple[bytes, ...]) -> bytes:
    return b"".join(struct.pack("<I", len(f)) + f for f in fields)


@st.composite
def entries(draw: st.DrawFn) -> ImaEntry:
    """Mostly the common shape (ima-ng/ima-sig/ima-buf, known algorithm, empty third field),
    now and then what the fast parser leaves to the general one."""
    template = draw(st.sampled_from(["ima-ng"] * 4 + ["ima-sig", "ima-buf", "ima"]))
    pcr = draw(st.sampled_from([10, 10, 10, 10, 11, 0, 23]))
    name = draw(NAMES)
    violation = draw(st.integers(0, 9)) == 0
    if template == "ima":
        d = bytes(20) if violation else draw(st.binary(min_size=20, max_size=20))
        fields: tuple[bytes, ...] = (d, name + b"\0")
        data = d + fields[1].ljust(256, b"\0")
    else:
        algo = draw(st.sampled_from(sorted(ALGOS)))
        size = ALGOS[algo]
        if violation:
            digest = bytes(size)
        elif size == 32 and algo == "sha256":
            digest = draw(
                DIGESTS.filter(lambda d: len(d) == 32) | st.binary(min_size=32, max_size=32)
            )
        else:
            digest = draw(st.binary(min_size=size, max_size=size))
        fields = (algo.encode() + b":\0" + digest, name + b"\0")
        if template != "ima-ng":
            fields += (draw(st.sampled_from([b"", b"", b"", b"\x03\x02\x04sig"])),)
        data = _td(fields)
    if violation:
        th = bytes(20)
    elif draw(st.integers(0, 15)) == 0:
        th = draw(st.binary(min_size=20, max_size=20).filter(any))  # a wrong one now and then
    else:
        th = hashlib.sha1(data).digest()
    return ImaEntry(pcr, th, template, fields)


LISTS = st.lists(entries(), max_size=12)


def _unsupported(pcr: int = 10) -> bytes:
    """A binary entry of a template we do not decode."""
    name = b"ima-ngv2"
    return (
        struct.pack("<I", pcr)
        + b"\x01" * 20
        + struct.pack("<I", len(name))
        + name
        + (struct.pack("<I", 3) + b"abc")
    )


def _outcome(fn: Callable[[], object]) -> object:
    """What ``fn`` returns, or its error as (class, message, id) so two paths can be compared."""
    try:
        return fn()
    except (VtpmError, ValueError) as err:
        return (type(err), str(err), getattr(err, "id", None))


def _listed(columns: ima.VerifiedImaColumns) -> dict[str, list[object]]:
    return {f.name: list(getattr(columns, f.name)) for f in dataclasses.fields(columns)}


def _general(raw: RawImaList) -> RawImaList:
    """The same list, entry by entry (no columns)."""
    return RawImaList(raw.format, raw.entries, raw.truncated_tail, raw.truncated_at)


def _mutate(blob: bytearray, data: st.DataObject) -> bytes:
    for _ in range(data.draw(st.integers(1, 4))):
        if not blob:
            break
        pos = data.draw(st.integers(0, len(blob) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "byte", "cut"]))
        if op == "flip":
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del blob[pos]
        elif op == "cut":
            del blob[pos:]
        else:
            blob[pos] = data.draw(st.sampled_from(b"\x00\n\xff:\x06\x07( A0-"))
    return bytes(blob)


# --------------------------------------------------------------------------------------------
# Parse


FORMATS = st.sampled_from(["binary", "ascii"])


def _encode(es: list[ImaEntry], fmt: str) -> bytes:
    return encode_binary(es) if fmt == "binary" else encode_ascii(es)


def _unsupported_line(pcr: int = 10) -> bytes:
    return b"%2d %s ima-ngv2 abc\n" % (pcr, b"01" * 20)


def _assert_same_parse(data: bytes, fmt: str = "binary") -> RawImaList | None:
    fast = _outcome(lambda: parse_ima_list(data, fmt))  # type: ignore[arg-type]
    parse = ima._parse_binary if fmt == "binary" else ima._parse_ascii
    general = _outcome(lambda: parse(data))
    if not isinstance(general, RawImaList):
        assert fast == general
        return None
    assert isinstance(fast, RawImaList)
    assert fast._columns is not None and general._columns is None
    assert len(fast) == len(general.entries)
    assert [fast.entry(i) for i in range(len(fast))] == list(general.entries)  # one by one
    assert fast.entries == general.entries and fast == general  # entries, tail, location
    assert (fast.truncated_tail, fast.truncated_at) == (
        general.truncated_tail,
        general.truncated_at,
    )
    return fast


@SETTINGS
@given(LISTS, FORMATS)
def test_parse_valid_lists_alike(es: list[ImaEntry], fmt: str) -> None:
    raw = _assert_same_parse(_encode(es, fmt), fmt)
    assert raw is not None and [(e.pcr, e.fields) for e in raw.entries] == [
        (e.pcr, e.fields) for e in es
    ]


@SETTINGS
@given(LISTS, FORMATS, st.data())
def test_parse_mutated_lists_alike(es: list[ImaEntry], fmt: str, data: st.DataObject) -> None:
    blob = bytearray(_encode(es, fmt))
    if data.draw(st.booleans()):
        blob += _unsupported() if fmt == "binary" else _unsupported_line()
    _assert_same_parse(_mutate(blob, data), fmt)


@pytest.mark.parametrize("fmt", ["binary", "ascii"])
@pytest.mark.parametrize(
    ("template", "third"),
    [("ima-ng", None), ("ima-sig", b""), ("ima-sig", b"\x03sig"), ("ima-buf", b"")],
)
def test_parse_every_bit_flip_alike(template: str, third: bytes | None, fmt: str) -> None:
    """Each length, name and digest byte of common entries, changed one bit at a time."""
    extra = () if third is None else (third,)
    good = ImaEntry(10, b"\x01" * 20, template, (b"sha256:\0" + b"\x02" * 32, b"/a\0", *extra))
    violation = ImaEntry(10, bytes(20), template, (b"sha1:\0" + bytes(20), b"/v\0", *extra))
    data = _encode([good, violation, good], fmt)
    for pos in range(len(data)):
        for bit in range(8):
            blob = bytearray(data)
            blob[pos] ^= 1 << bit
            _assert_same_parse(bytes(blob), fmt)


def test_parse_runs_around_entries_the_general_parser_reads() -> None:
    common = ImaEntry(10, bytes(20), "ima-ng", (b"sha256:\0" + bytes(32), b"/a\0"))
    legacy = ImaEntry(10, b"\x01" * 20, "ima", (b"\x02" * 20, b"/legacy\0"))
    signed = ImaEntry(10, b"\x01" * 20, "ima-sig", (b"sha256:\0" + bytes(32), b"/s\0", b"sig"))
    data = encode_binary([common, legacy, common, signed, common]) + _unsupported(11)
    raw = _assert_same_parse(data + b"\x0a\x00")  # and a truncated tail
    assert raw is not None and raw.truncated_tail and raw._columns is not None
    assert set(raw._columns.general) == {1, 3, 5}
    assert raw.entry(5).template_name == "ima-ngv2" and raw.entry(4).location == data.rindex(
        b"\x0a\x00\x00\x00" + bytes(20) + b"\x06"
    )


def test_lazy_lists_copy_and_pickle_by_value() -> None:
    es = [ImaEntry(10, bytes(20), "ima-ng", (b"sha256:\0" + bytes(32), b"/v\0"))]
    raw = parse_ima_list(encode_binary(es), "binary")
    verified = replay_ima(raw, replay_ima_pcr10(raw, "5.8", ("sha256",)).pcr10, "5.8")
    for value in (raw, verified):
        assert pickle.loads(pickle.dumps(value)) == value == copy.deepcopy(value)
    with pytest.raises(AttributeError):
        raw.truncated_tail = True  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Replay


BANK_SETS = st.sampled_from(
    [("sha1",), ("sha256",), ("sha1", "sha256"), ("sha384", "sha512"), ("sha512", "sha1")]
)


@SETTINGS
@given(LISTS, st.sampled_from(list(KernelRule)), BANK_SETS, FORMATS, st.data())
def test_replay_alike(
    es: list[ImaEntry], rule: KernelRule, banks: tuple[str, ...], fmt: str, data: st.DataObject
) -> None:
    blob = _encode(es, fmt)
    if data.draw(st.integers(0, 5)) == 0:
        pcr = data.draw(st.sampled_from([10, 3]))
        blob += _unsupported(pcr) if fmt == "binary" else _unsupported_line(pcr)
    raw = parse_ima_list(blob, fmt)  # type: ignore[arg-type]
    hashless = data.draw(st.sampled_from([(), ("sha384",), ("sha384", "sha512")]))
    fast = _outcome(lambda: replay_ima_pcr10(raw, rule, banks, kernel_hashless_banks=hashless))
    general = _outcome(
        lambda: replay_ima_pcr10(_general(raw), rule, banks, kernel_hashless_banks=hashless)
    )
    assert fast == general


@SETTINGS
@given(LISTS, st.sampled_from(list(KernelRule)), BANK_SETS, FORMATS, st.data())
def test_replay_ima_alike(
    es: list[ImaEntry], rule: KernelRule, banks: tuple[str, ...], fmt: str, data: st.DataObject
) -> None:
    """Same verified list or the same error, for the right values and for wrong ones."""
    raw = parse_ima_list(_encode(es, fmt), fmt)  # type: ignore[arg-type]
    if data.draw(st.booleans()):
        expected = dict(replay_ima_pcr10(_general(raw), rule, banks).pcr10)
    else:
        expected = {b: secrets.token_bytes(ima._BANK_SIZE[b]) for b in banks}
    allow_sha1 = data.draw(st.booleans())
    fast = _outcome(lambda: replay_ima(raw, expected, rule, allow_sha1=allow_sha1))
    general = _outcome(lambda: replay_ima(_general(raw), expected, rule, allow_sha1=allow_sha1))
    if isinstance(fast, VerifiedImaList):
        assert isinstance(general, VerifiedImaList)
        assert fast.is_columnar and not general.is_columnar
        assert len(fast) == len(general.entries)
        assert [fast.entry(k) for k in range(len(fast))] == list(general.entries)
        assert _listed(fast.columns()) == _listed(general.columns())
        assert fast._entries is None  # neither built them all
        assert (fast.violations, fast.untrusted_other_pcr_entries) == (
            general.violations,
            general.untrusted_other_pcr_entries,
        )
    assert fast == general


@SETTINGS
@given(LISTS, st.sampled_from(list(KernelRule)), st.sampled_from(list(ima.BANKS)), st.data())
def test_signed_prefix_alike(
    es: list[ImaEntry], rule: KernelRule, bank: str, data: st.DataObject
) -> None:
    blob = encode_binary(es)
    if data.draw(st.integers(0, 4)) == 0:
        blob += _unsupported()
    raw = parse_ima_list(blob, "binary")
    cut = data.draw(st.integers(0, len(raw)))
    prefix = raw.prefix(cut)
    assert prefix.entries == raw.entries[:cut] and not prefix.truncated_tail
    want = _outcome(lambda: replay_ima_pcr10(_general(prefix), rule, (bank,)).pcr10[bank])
    if not isinstance(want, bytes):
        want = secrets.token_bytes(ima._BANK_SIZE[bank])
    fast = signed_prefix(raw, bank, rule, want)
    assert fast == signed_prefix(_general(raw), bank, rule, want)
    assert fast is None or fast <= cut


# --------------------------------------------------------------------------------------------
# Policy


@pytest.fixture(scope="module")
def template_vm() -> AttestedVm:
    world = default_world()
    nonce = secrets.token_bytes(32)
    return verify_bundle(world.bundle(nonce), world.options(nonce))


ALLOWLISTS = st.builds(
    ImaAllowlist,
    digests=st.dictionaries(
        st.sampled_from(
            ["/usr/bin/a", "/usr/bin/b", "/etc/c", "boot_aggregate", "/tmp/\udcff\udcfe"]
        ),
        st.frozensets(DIGESTS | st.just(bytes(32)), min_size=1, max_size=2),
        max_size=5,
    ),
    excludes=st.sampled_from([(), ("/etc",), ("/usr/bin/b$", "/tmp")]),
    ima_buf=st.dictionaries(
        st.sampled_from(["/usr/bin/a", "/etc/c"]), st.just(frozenset({b"\x11" * 32}))
    ),
    keyrings=st.dictionaries(st.sampled_from(["/usr/bin/b"]), st.just(frozenset({b"\x22" * 32}))),
    ignored_keyrings=st.sampled_from([frozenset(), frozenset({"/etc/c"}), frozenset({"*"})]),
)


@SETTINGS
@given(LISTS, ALLOWLISTS, st.integers(0, 3), st.booleans())
def test_findings_alike(
    template_vm: AttestedVm,
    es: list[ImaEntry],
    allow: ImaAllowlist,
    tail: int,
    truncated: bool,
) -> None:
    es = [e for e in es if e.template_hash == bytes(20) or e.template_hash_ok()]
    blob = encode_binary(es) + (b"\x0a\x00" if truncated else b"")
    raw = parse_ima_list(blob, "binary")
    assume(all(e.supported for e in raw.entries))
    expected = {"sha256": replay_ima_pcr10(_general(raw), "5.8", ("sha256",)).pcr10["sha256"]}
    fast = replay_ima(raw, expected, "5.8")
    general = replay_ima(_general(raw), expected, "5.8")
    refs = ReferenceValues(ima=allow)
    fast_vm = dataclasses.replace(template_vm, ima=fast, ima_unverified_tail=tail)
    general_vm = dataclasses.replace(template_vm, ima=general, ima_unverified_tail=tail)
    got = evaluate_reference_values(fast_vm, refs)
    assert got == evaluate_reference_values(general_vm, refs)
    assert fast._entries is None  # the fast path built only the entries with findings


def _entry(template: str, name: bytes, digest: bytes, violation: bool = False) -> ImaEntry:
    fields: tuple[bytes, ...] = (b"sha256:\0" + digest, name + b"\0")
    if template != "ima-ng":
        fields += (b"",)
    return ImaEntry(
        10, bytes(20) if violation else hashlib.sha1(_td(fields)).digest(), template, fields
    )


def test_findings_of_entries_a_digest_lookup_alone_would_pass(template_vm: AttestedVm) -> None:
    """A listed path with a listed digest still gives a finding as ima-buf or as a violation."""
    listed = b"\x11" * 32
    es = [
        _entry("ima-ng", b"/usr/bin/a", listed),
        _entry("ima-buf", b"/usr/bin/a", listed),
        _entry("ima-ng", b"/usr/bin/a", bytes(32), violation=True),
        _entry("ima-sig", b"/usr/bin/b", listed),
    ]
    allow = ImaAllowlist(digests={"/usr/bin/a": {listed, bytes(32)}, "/usr/bin/b": {listed}})
    raw = parse_ima_list(encode_binary(es), "binary")
    expected = {"sha256": replay_ima_pcr10(raw, "5.8", ("sha256",)).pcr10["sha256"]}
    fast = replay_ima(raw, expected, "5.8")
    general = replay_ima(_general(raw), expected, "5.8")
    refs = ReferenceValues(ima=allow)
    got = evaluate_reference_values(dataclasses.replace(template_vm, ima=fast), refs)
    assert got.ids == ("ima.buf.unknown", "ima.entry.violation")
    assert [f.context["index"] for f in got.findings] == ["1", "2"]
    assert got == evaluate_reference_values(dataclasses.replace(template_vm, ima=general), refs)


@SETTINGS
@given(st.lists(st.binary(max_size=8).map(lambda b: b.replace(b"\0", b"")), max_size=8))
def test_paths_decode_in_one_go_like_one_by_one(names: list[bytes]) -> None:
    assert policy_module._paths(names) == [policy_module._path(n) for n in names]


# --------------------------------------------------------------------------------------------
# Bundle base64


B64_TEXT = st.text(alphabet="ABCDQRSTUVWXYZabcdwxyz0123456789+/=AQgw é\n", max_size=16)


def _b64_before(value: str) -> bytes | str:
    """What bundle._b64 did before issue 7: the decoded bytes, or the ``expected`` of its error."""
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return "standard padded base64 (RFC 4648 §4)"
    if base64.b64encode(data).decode("ascii") != value:
        return "canonical standard padded base64 (RFC 4648 §4)"
    return data


@SETTINGS
@given(st.one_of(B64_TEXT, st.binary(max_size=10).map(lambda b: base64.b64encode(b).decode())))
def test_bundle_base64_reads_as_before(value: str) -> None:
    try:
        got: bytes | str = bundle_module._b64(value, "$.x")
    except ParseError as err:
        got = err.expected
    assert got == _b64_before(value)

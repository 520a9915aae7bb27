"""evidence.policy: reference values, Keylime import, learn, and the findings they yield.

VMs are verified from software-signed factory bundles (tests/helpers/evidence_factory.py).
"""

from __future__ import annotations

import ast
import enum
import hashlib
import json
import secrets
import struct
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from evidence.errors import ParseError, UnsupportedError
from evidence.ima import ImaEntry, encode_binary, parse_ima_list, replay_ima_pcr10
from evidence.policy import (
    ImaAllowlist,
    ReferenceValues,
    encode_reference_values,
    evaluate_reference_values,
    import_keylime_runtime_policy,
    learn_reference_values,
    parse_reference_values,
)
from evidence.verify import AttestedVm, verify_bundle
from tests.helpers.evidence_factory import (
    DEFAULT_FILES,
    World,
    default_world,
    ima_ng_entry,
    make_boot,
)

KEYLIME_IMA = Path(jsonschema.__file__).parents[1] / "keylime" / "ima" / "ima.py"


@pytest.fixture(scope="module")
def world() -> World:
    return default_world()


def attest(world: World, **bundle: Any) -> AttestedVm:
    nonce = secrets.token_bytes(32)
    allow = {"allow_missing_eventlog": True} if bundle.get("event_log", "x") is None else {}
    return verify_bundle(world.bundle(nonce, **bundle), world.options(nonce, **allow))


@pytest.fixture(scope="module")
def good(world: World) -> AttestedVm:
    return attest(world)


@pytest.fixture(scope="module")
def refs(good: AttestedVm) -> ReferenceValues:
    return learn_reference_values(good)


def with_files(world: World, *files: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"boot": make_boot(files=(*DEFAULT_FILES, *files))}


def signed_pcr10(ima_list: bytes) -> bytes:
    return replay_ima_pcr10(parse_ima_list(ima_list), "5.8", ("sha256",)).pcr10["sha256"]


# ---------------------------------------------------------------- learn, then evaluate


def test_learned_values_accept_the_vm_they_came_from(good: AttestedVm) -> None:
    refs = learn_reference_values(good)
    verdict = evaluate_reference_values(good, refs)
    assert verdict.trusted and verdict.findings == ()
    assert refs.ima is not None and "boot_aggregate" not in refs.ima.digests
    assert set(refs.events) == set(range(8))


def test_ima_entry_not_in_the_allowlist_is_its_own_finding(
    world: World, refs: ReferenceValues
) -> None:
    """Issue 7: an IMA entry not in the allowlist → ima.entry.unknown_file (evidence is valid)."""
    vm = attest(world, **with_files(world, (b"/usr/bin/evil", b"payload")))
    verdict = evaluate_reference_values(vm, refs)
    assert not verdict.trusted
    assert verdict.ids == ("ima.entry.unknown_file",)
    finding = verdict.findings[0]
    assert finding.context["path"] == "/usr/bin/evil"
    assert finding.to_json()["id"] == "ima.entry.unknown_file"


def test_known_file_with_another_digest(world: World, refs: ReferenceValues) -> None:
    files = [(p, b"trojaned bash" if p == b"/usr/bin/bash" else c) for p, c in DEFAULT_FILES]
    vm = attest(world, boot=make_boot(files=files))
    verdict = evaluate_reference_values(vm, refs)
    assert verdict.ids == ("ima.entry.digest_mismatch",)
    assert verdict.findings[0].got is not None


def test_excluded_paths_are_not_checked(world: World, refs: ReferenceValues) -> None:
    assert refs.ima is not None
    vm = attest(world, **with_files(world, (b"/tmp/scratch-42", b"anything")))
    assert evaluate_reference_values(vm, refs).ids == ("ima.entry.unknown_file",)
    relaxed = ReferenceValues(
        refs.bank,
        refs.pcrs,
        refs.events,
        ImaAllowlist(digests=refs.ima.digests, excludes=(r"/tmp/",)),
    )
    assert evaluate_reference_values(vm, relaxed).trusted


def test_violation_is_a_finding(world: World, refs: ReferenceValues) -> None:
    entries = [*world.boot.ima_entries]
    violation = ima_ng_entry(b"/var/log/app.log", b"", digest=bytes(32))
    violation = type(violation)(10, bytes(20), "ima-ng", violation.fields)
    boot = make_boot()
    ima_list = encode_binary([*entries, violation])
    vpcrs = {**boot.vpcrs, 10: signed_pcr10(ima_list)}
    vm = attest(world, ima_list=ima_list, vpcrs=vpcrs)
    assert evaluate_reference_values(vm, refs).ids == ("ima.entry.violation",)


def test_boot_aggregate_checked_against_the_signed_vpcrs(
    world: World, refs: ReferenceValues
) -> None:
    entries = list(world.boot.ima_entries)
    entries[0] = ima_ng_entry(b"boot_aggregate", b"", digest=b"\x42" * 32)
    ima_list = encode_binary(entries)
    vpcrs = {**world.boot.vpcrs, 10: signed_pcr10(ima_list)}
    vm = attest(world, ima_list=ima_list, vpcrs=vpcrs)
    verdict = evaluate_reference_values(vm, refs)
    assert verdict.ids == ("ima.boot_aggregate.mismatch",)


def test_ima_buf_entries(world: World) -> None:
    def buf(name: bytes, data: bytes) -> ImaEntry:
        fields = (b"sha256:\x00" + hashlib.sha256(data).digest(), name + b"\x00", data)
        hi = b"".join(struct.pack("<I", len(f)) + f for f in fields)
        return ImaEntry(10, hashlib.sha1(hi).digest(), "ima-buf", fields)

    entries = [*world.boot.ima_entries, buf(b"kernel_version", b"6.1.0"), buf(b".ima", b"key")]
    ima_list = encode_binary(entries)
    vpcrs = {**world.boot.vpcrs, 10: signed_pcr10(ima_list)}
    vm = attest(world, ima_list=ima_list, vpcrs=vpcrs)
    learned = learn_reference_values(vm)
    assert learned.ima is not None and set(learned.ima.ima_buf) == {"kernel_version", ".ima"}
    assert evaluate_reference_values(vm, learned).trusted
    base = learn_reference_values(attest(world))
    assert base.ima is not None
    verdict = evaluate_reference_values(vm, base)
    assert verdict.ids == ("ima.buf.unknown", "ima.buf.unknown")
    keyring = ImaAllowlist(
        digests=base.ima.digests,
        ima_buf={"kernel_version": {b"\x00" * 32}},
        ignored_keyrings=frozenset({".ima"}),
    )
    refs = ReferenceValues(base.bank, base.pcrs, base.events, keyring)
    assert evaluate_reference_values(vm, refs).ids == ("ima.buf.digest_mismatch",)


def test_boot_findings(world: World, refs: ReferenceValues, good: AttestedVm) -> None:
    other_kernel = attest(world, boot=make_boot(kernel=b"vmlinuz-evil"))
    verdict = evaluate_reference_values(other_kernel, refs)
    assert verdict.ids == ("boot.event.unknown_digest",)
    assert verdict.findings[0].context["pcr"] == "4"

    pinned = learn_reference_values(good, pin_pcrs=[8, 9])
    assert evaluate_reference_values(good, pinned).trusted
    strict = ReferenceValues(pinned.bank, {8: {b"\x01" * 32}, 23: {b"\x00" * 32}}, {}, None)
    assert evaluate_reference_values(good, strict).ids == (
        "boot.pcr.mismatch",
        "boot.pcr.not_signed",
    )

    unverified = ReferenceValues(refs.bank, {}, {14: {b"\x00" * 32}}, None)
    assert evaluate_reference_values(good, unverified).ids == ("boot.event.pcr_not_verified",)

    no_log = attest(world, event_log=None)
    assert evaluate_reference_values(no_log, refs).ids == ("boot.eventlog.missing",)


def test_missing_or_truncated_ima_list(world: World, refs: ReferenceValues) -> None:
    nonce = secrets.token_bytes(32)
    vm = verify_bundle(
        world.bundle(nonce, ima_list=None), world.options(nonce, allow_missing_ima=True)
    )
    assert evaluate_reference_values(vm, refs).ids == ("ima.list.missing",)
    truncated = world.boot.ima_list + encode_binary([ima_ng_entry(b"/x", b"y")])[:-3]
    vm = attest(world, ima_list=truncated)
    verdict = evaluate_reference_values(vm, refs)
    assert verdict.ids == ("ima.list.truncated_tail",) and verdict.trusted


# ---------------------------------------------------------------- our JSON


def test_reference_values_round_trip(refs: ReferenceValues) -> None:
    text = encode_reference_values(refs)
    assert parse_reference_values(text) == refs
    assert encode_reference_values(parse_reference_values(text.encode())) == text


@pytest.mark.parametrize(
    ("mutate", "what"),
    [
        (lambda d: d.update(format="other/1"), "$.format"),
        (lambda d: d.update(extra=1), "$.extra"),
        (lambda d: d.update(bank="md5"), "$.bank"),
        (lambda d: d["events"].update({"24": ["00" * 32]}), '$.events["24"]'),
        (lambda d: d["events"].update({"1": ["XYZ"]}), '$.events["1"][0]'),
        (lambda d: d["events"].update({"1": []}), '$.events["1"]'),
        (lambda d: d["ima"].update(excludes=["("]), "$.ima.excludes"),
        (lambda d: d["ima"].pop("digests"), "$.ima.digests"),
    ],
)
def test_reference_values_parse_strictly(refs: ReferenceValues, mutate: Any, what: str) -> None:
    doc = json.loads(encode_reference_values(refs))
    mutate(doc)
    with pytest.raises(ParseError) as info:
        parse_reference_values(json.dumps(doc))
    assert info.value.what == what


# ---------------------------------------------------------------- Keylime runtime policies


def keylime_schema() -> dict[str, Any]:
    """keylime 7.14.3's own RUNTIME_POLICY_SCHEMA, read from its source (its module imports gpg,
    which the test venv lacks): the generator enum and the schema literal are evaluated alone."""
    tree = ast.parse(KEYLIME_IMA.read_text())
    wanted: list[ast.stmt] = [
        node
        for node in tree.body
        if (isinstance(node, ast.ClassDef) and node.name == "RUNTIME_POLICY_GENERATOR")
        or (
            isinstance(node, ast.Assign)
            and any(getattr(t, "id", "") == "RUNTIME_POLICY_SCHEMA" for t in node.targets)
        )
    ]
    namespace: dict[str, Any] = {"enum": enum}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(KEYLIME_IMA), "exec"), namespace)
    schema: dict[str, Any] = namespace["RUNTIME_POLICY_SCHEMA"]
    return schema


def keylime_policy(**over: Any) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "meta": {"version": 1, "generator": 2, "timestamp": "2026-11-27"},
        "release": 0,
        "digests": {
            "/usr/bin/bash": [hashlib.sha256(b"bash 5.2").hexdigest()],
            "/usr/sbin/sshd": [hashlib.sha256(b"openssh 9.2").hexdigest()],
            "/usr/bin/python3.11": [hashlib.sha256(b"python 3.11.2").hexdigest()],
        },
        "excludes": ["/tmp/.*", "boot_aggregate"],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }
    policy.update(over)
    return policy


def test_keylime_policy_is_valid_by_keylimes_own_schema() -> None:
    jsonschema.validate(keylime_policy(), keylime_schema())


def test_imported_keylime_policy_accepts_the_good_vm(world: World, good: AttestedVm) -> None:
    allow = import_keylime_runtime_policy(json.dumps(keylime_policy()))
    refs = ReferenceValues(ima=allow)
    assert evaluate_reference_values(good, refs).trusted
    evil = attest(world, **with_files(world, (b"/usr/bin/evil", b"x")))
    assert evaluate_reference_values(evil, refs).ids == ("ima.entry.unknown_file",)


@pytest.mark.parametrize(
    ("policy", "error", "what"),
    [
        ({"payload": "e30=", "payloadType": "x", "signatures": []}, UnsupportedError, "$.payload"),
        (keylime_policy(meta={"version": 2}), UnsupportedError, "$.meta.version"),
        (
            keylime_policy(ima={"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": {}}),
            UnsupportedError,
            "$.ima.dm_policy",
        ),
        (keylime_policy(digests={"/x": ["zz"]}), ParseError, '$.digests["/x"][0]'),
        (keylime_policy(excludes=["(unclosed"]), ParseError, "$.excludes"),
        ({"meta": {"version": 1}}, ParseError, "$.digests"),
    ],
)
def test_keylime_import_rejects(policy: dict[str, Any], error: type[ParseError], what: str) -> None:
    with pytest.raises(error) as info:
        import_keylime_runtime_policy(json.dumps(policy))
    assert info.value.what == what


def test_evaluate_takes_only_attested_vms() -> None:
    with pytest.raises(TypeError):
        evaluate_reference_values("vm", ReferenceValues())  # type: ignore[arg-type]


def test_entries_after_the_signed_pcr_are_a_warning(world: World, refs: ReferenceValues) -> None:
    """Entries IMA appended after the quote are not checked (not even if unknown), only counted."""
    ahead = encode_binary([*world.boot.ima_entries, ima_ng_entry(b"/usr/bin/evil", b"later")])
    vm = attest(world, ima_list=ahead)
    verdict = evaluate_reference_values(vm, refs)
    assert verdict.ids == ("ima.list.unverified_tail",) and verdict.trusted
    assert verdict.findings[0].got == "1"


@pytest.mark.parametrize("key", ["²", "٣", "-1", "24", " 1"])
def test_pcr_keys_are_ascii_indices(refs: ReferenceValues, key: str) -> None:
    doc = json.loads(encode_reference_values(refs))
    doc["pcrs"] = {key: ["00" * 32]}
    with pytest.raises(ParseError):
        parse_reference_values(json.dumps(doc))


def test_keylime_version_true_is_not_1() -> None:
    with pytest.raises(UnsupportedError):
        import_keylime_runtime_policy(json.dumps(keylime_policy(meta={"version": True})))

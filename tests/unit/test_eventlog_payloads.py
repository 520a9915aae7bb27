"""Payload decoding: real events from the corpus, tpm2-tools' decodings, and hostile payloads."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from evidence._eventlog_payloads import (
    EFI_CERT_SHA256_GUID,
    EFI_CERT_X509_GUID,
    EFI_GLOBAL_VARIABLE_GUID,
    EFI_IMAGE_SECURITY_DATABASE_GUID,
    decode_device_path,
    decode_payload,
    printable,
)
from evidence.errors import ParseError
from evidence.eventlog import (
    EfiGptEvent,
    EfiHandoffTables,
    EfiImageLoad,
    EfiVariable,
    EventType,
    NoActionEvent,
    PlatformFirmwareBlob,
    RawEventLog,
    SeparatorEvent,
    StartupLocality,
    TextEvent,
    parse_tcg2_log,
)

EVENTLOGS = "go-tpm-tools/internal/test/eventlogs"
FIXTURES = "tpm2-tools/test/integration/fixtures"


def _log(corpus: Path, name: str) -> RawEventLog:
    return parse_tcg2_log((corpus / name).read_bytes())


def _variable(name: str, value: bytes, guid: uuid.UUID = EFI_GLOBAL_VARIABLE_GUID) -> bytes:
    encoded = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(value)) + encoded + value


# --- real events -------------------------------------------------------------------------------


def test_rhel8_secure_boot_variables(corpus: Path) -> None:
    events = _log(corpus, f"{EVENTLOGS}/rhel8-uefi.bin").events
    secure_boot, pk, kek, db, dbx = (e.payload for e in events[3:8])
    assert isinstance(secure_boot, EfiVariable) and secure_boot.secure_boot is True
    assert secure_boot.known == "SecureBoot" and secure_boot.guid == EFI_GLOBAL_VARIABLE_GUID
    assert isinstance(pk, EfiVariable) and pk.known == "PK" and pk.signatures is not None
    cert = x509.load_der_x509_certificate(pk.signatures[0].data)
    assert cert.subject.rfc4514_string()
    assert isinstance(kek, EfiVariable) and kek.known == "KEK"
    assert isinstance(db, EfiVariable) and db.guid == EFI_IMAGE_SECURITY_DATABASE_GUID
    assert db.summary() == "db: 2 X509"
    assert isinstance(dbx, EfiVariable) and dbx.signatures is not None
    types = [s.signature_type for s in dbx.signatures]
    assert types.count(EFI_CERT_X509_GUID) == 3 and types.count(EFI_CERT_SHA256_GUID) == 183
    assert all(
        len(s.data) == 32 for s in dbx.signatures if s.signature_type == EFI_CERT_SHA256_GUID
    )


def test_rhel8_boot_variables(corpus: Path) -> None:
    events = _log(corpus, f"{EVENTLOGS}/rhel8-uefi.bin").events
    order, boot2 = events[9].payload, events[10].payload
    assert isinstance(order, EfiVariable) and order.boot_order == (2, 0, 1)
    assert order.summary() == "BootOrder = Boot0002,Boot0000,Boot0001"
    assert isinstance(boot2, EfiVariable) and boot2.known == "Boot####"
    assert boot2.load_option is not None
    assert boot2.load_option.description == "Red Hat Enterprise Linux"
    assert boot2.load_option.device_path.file_path == "\\EFI\\redhat\\shimx64.efi"


def test_variable_authority_certificate(corpus: Path) -> None:
    event = _log(corpus, f"{EVENTLOGS}/rhel8-uefi.bin").events[21]
    assert event.event_type is EventType.EV_EFI_VARIABLE_AUTHORITY
    assert isinstance(event.payload, EfiVariable) and event.payload.signatures
    x509.load_der_x509_certificate(event.payload.signatures[0].data)


def test_gpt_event(corpus: Path) -> None:
    gpt = _log(corpus, f"{EVENTLOGS}/rhel8-uefi.bin").events[22].payload
    assert isinstance(gpt, EfiGptEvent)
    assert gpt.disk_guid == uuid.UUID("2aeb90b6-e13c-4197-8ee2-59e9ed2959dc")
    assert [p.name for p in gpt.partitions] == ["EFI System Partition", ""]
    assert all(p.first_lba <= p.last_lba for p in gpt.partitions)


def test_image_load_event(corpus: Path) -> None:
    image = _log(corpus, f"{FIXTURES}/event-bootorder.bin").events[25].payload
    assert isinstance(image, EfiImageLoad)
    assert image.image_location_in_memory == 0xBEC2B018
    assert image.image_length_in_memory == 1334816
    assert image.image_link_time_address == 0
    assert image.device_path.file_path == "\\EFI\\BOOT\\BOOTX64.EFI"
    assert image.summary() == "\\EFI\\BOOT\\BOOTX64.EFI (1334816 bytes)"


def test_shim_trailing_bytes_are_kept_not_flagged(corpus: Path) -> None:
    event = _log(corpus, f"{EVENTLOGS}/debian-10.bin").events[23]
    assert isinstance(event.payload, EfiVariable) and event.decode_problem is None
    assert event.payload.trailing == b"\x00" * 5 + b"\xaf"


def test_text_blob_locality_and_no_action(corpus: Path) -> None:
    glinux = _log(corpus, f"{EVENTLOGS}/glinux-alex.bin").events
    assert glinux[1].payload == StartupLocality(3)
    assert glinux[5].payload == TextEvent("546bfb1e-1d0c-4055-a4ad-4ef4bf17b83a", "guid")
    assert glinux[6].payload == PlatformFirmwareBlob(0xFF130000, 0xA80000)
    sp800 = _log(corpus, f"{EVENTLOGS}/eventlogwithsp800155.bin").events
    assert isinstance(sp800[1].payload, NoActionEvent)
    assert sp800[1].payload.signature == "SP800-155 Event3"
    assert sp800[3].payload == TextEvent("GCE Virtual Firmware v2", "utf-16-le")
    blob = _log(corpus, f"{FIXTURES}/event.bin").events[1].payload
    assert blob == PlatformFirmwareBlob(0x900000, 0xB00000)


def test_actions_and_separators(corpus: Path) -> None:
    events = _log(corpus, f"{FIXTURES}/event-bootorder.bin").events
    assert events[16].payload == TextEvent("Calling EFI Application from Boot Option", "ascii")
    assert events[17].payload == SeparatorEvent(0)
    assert events[27].payload is not None
    assert events[27].payload.summary().startswith("'grub_cmd: [ -z (hd0,gpt15)")


def test_variables_match_tpm2_tools_decoding(corpus: Path) -> None:
    """Every UEFI variable tpm2-tools decoded: same GUID, name and data length."""
    checked = 0
    for path in sorted((corpus / FIXTURES / "event-pretty-39").glob("*.yaml")):
        events = yaml.safe_load(path.read_text())["events"]
        if not isinstance(events, list):
            continue
        log = _log(corpus, f"{FIXTURES}/{path.name[:-5]}")
        for ev in events:
            event = ev.get("Event")
            if not isinstance(event, dict) or "UnicodeName" not in event:
                continue
            ours = log.events[ev["EventNum"]].payload
            assert isinstance(ours, EfiVariable)
            assert str(ours.guid) == event["VariableName"]
            assert ours.name == event["UnicodeName"]
            assert len(ours.data) == event["VariableDataLength"]
            checked += 1
    assert checked > 50


# --- hand-built and hostile payloads -----------------------------------------------------------


def test_printable_escapes_terminal_control_sequences() -> None:
    text = printable("\x1b[2J\x07ok\r\n")
    assert "\x1b" not in text and "\x07" not in text and "\n" not in text
    assert text == "\\x1b[2J\\x07ok\\r\\n"
    assert len(printable("x" * 1000)) == 120


def test_hostile_text_is_escaped_in_summaries() -> None:
    payload, problem = decode_payload(EventType.EV_EFI_ACTION, b"\x1b]0;pwned\x07")
    assert problem is None and payload is not None
    assert "\x1b" not in payload.summary()


@pytest.mark.parametrize(
    ("etype", "data", "fragment"),
    [
        (EventType.EV_SEPARATOR, b"\x00\x00", "expected 4 bytes"),
        (EventType.EV_EFI_BOOT_SERVICES_APPLICATION, b"\x00" * 16, "ImageLinkTimeAddress"),
        (
            EventType.EV_EFI_BOOT_SERVICES_APPLICATION,
            struct.pack("<QQQQ", 0, 0, 0, 2**62),
            "DevicePath",
        ),
        (EventType.EV_EFI_VARIABLE_BOOT, _variable("BootOrder", b"\x01\x00\x02"), "even number"),
        (EventType.EV_EFI_VARIABLE_BOOT, _variable("Boot0001", b"\x01" * 12), "Description"),
        (
            EventType.EV_EFI_VARIABLE_DRIVER_CONFIG,
            _variable(
                "db",
                EFI_CERT_X509_GUID.bytes_le + struct.pack("<III", 28, 0, 0),
                EFI_IMAGE_SECURITY_DATABASE_GUID,
            ),
            "EFI_SIGNATURE_LIST",
        ),
        (EventType.EV_EFI_GPT_EVENT, b"NOT PART" + bytes(84), "EFI PART"),
        (
            EventType.EV_EFI_GPT_EVENT,
            b"EFI PART" + bytes(76) + struct.pack("<II", 128, 0) + struct.pack("<Q", 2**63),
            "NumberOfPartitions",
        ),
        (EventType.EV_EFI_HANDOFF_TABLES, struct.pack("<Q", 2**40), "tables"),
        (EventType.EV_NO_ACTION, b"StartupLocality\x00", "17 bytes"),
        (EventType.EV_EFI_ACTION, b"\xff\xfe\xfd", "undecodable text"),
        (EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB, b"\x00" * 17, "end of data"),
    ],
)
def test_malformed_payloads_become_decode_problems(
    etype: EventType, data: bytes, fragment: str
) -> None:
    payload, problem = decode_payload(etype, data)
    assert payload is None
    assert problem is not None and fragment in problem
    assert problem.startswith(etype.name)


def test_opaque_types_decode_to_nothing_without_a_problem() -> None:
    assert decode_payload(EventType.EV_NONHOST_INFO, b"\x01\x02") == (None, None)
    assert decode_payload(0x7777, b"\x01") == (None, None)


def test_handoff_tables() -> None:
    guid = uuid.uuid4()
    payload, _ = decode_payload(
        EventType.EV_EFI_HANDOFF_TABLES,
        struct.pack("<Q", 1) + guid.bytes_le + struct.pack("<Q", 0x7F000000),
    )
    assert payload == EfiHandoffTables(((guid, 0x7F000000),))


def test_secure_boot_with_odd_size_is_not_guessed() -> None:
    payload, problem = decode_payload(
        EventType.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable("SecureBoot", b"")
    )
    assert problem is None and isinstance(payload, EfiVariable) and payload.secure_boot is None


def test_device_path_rendering() -> None:
    acpi = bytes([2, 1, 12, 0]) + struct.pack("<II", 0x0A0341D0, 0)
    pci = bytes([1, 1, 6, 0, 0, 3])
    file_path = "\\EFI\\BOOT\\BOOTX64.EFI\x00".encode("utf-16-le")
    file_node = bytes([4, 4]) + struct.pack("<H", 4 + len(file_path)) + file_path
    unknown = bytes([9, 9, 6, 0, 0xAB, 0xCD])
    end = bytes([0x7F, 0xFF, 4, 0])
    path = decode_device_path(acpi + pci + file_node + unknown + end)
    assert path.text == "PciRoot(0x0)/Pci(0x3,0x0)/\\EFI\\BOOT\\BOOTX64.EFI/Path(9,9,abcd)"
    assert path.file_path == "\\EFI\\BOOT\\BOOTX64.EFI"
    assert decode_device_path(b"").summary() == "(no device path)"


def test_device_path_too_many_nodes() -> None:
    with pytest.raises(ParseError, match="at most 256 nodes"):
        decode_device_path(bytes([1, 1, 6, 0, 0, 0]) * 300)

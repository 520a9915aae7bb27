"""Decoders for the payload (``Event`` bytes) of TCG PC Client firmware log events.

A payload is untrusted *content*, not structure: a malformed payload never fails the parse of the
log. :func:`decode_payload` returns the decoded value or, when the bytes do not fit the structure
the event type promises, ``None`` and a one-line problem, and the event keeps its raw bytes.

Structures follow the TCG PC Client Platform Firmware Profile Specification (PFP) 1.05 and the
UEFI Specification 2.10 (device paths §10.3, EFI_LOAD_OPTION §3.1.3, EFI_SIGNATURE_LIST §32.4.1,
GPT §5.3). All integers are little-endian.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, replace

from evidence._reader import Reader
from evidence.errors import ParseError

__all__ = [
    "EFI_CERT_SHA256_GUID",
    "EFI_CERT_X509_GUID",
    "EFI_GLOBAL_VARIABLE_GUID",
    "EFI_IMAGE_SECURITY_DATABASE_GUID",
    "SHIM_LOCK_GUID",
    "DevicePath",
    "EfiGptEvent",
    "EfiHandoffTables",
    "EfiImageLoad",
    "EfiLoadOption",
    "EfiSignature",
    "EfiVariable",
    "EventPayload",
    "EventType",
    "GptPartition",
    "NoActionEvent",
    "PlatformFirmwareBlob",
    "SeparatorEvent",
    "SpecIdAlgorithm",
    "SpecIdEvent",
    "StartupLocality",
    "TextEvent",
    "decode_device_path",
    "decode_payload",
    "is_spec_id_event03",
    "printable",
    "quoted",
]


class EventType(enum.IntEnum):
    """TCG event types (PFP 1.05, plus the 1.06 additions: ``*2`` types and SPDM), spelled as in
    the specification. Values the specification does not name stay plain ``int``s in events.
    """

    EV_PREBOOT_CERT = 0x0
    EV_POST_CODE = 0x1
    EV_UNUSED = 0x2
    EV_NO_ACTION = 0x3
    EV_SEPARATOR = 0x4
    EV_ACTION = 0x5
    EV_EVENT_TAG = 0x6
    EV_S_CRTM_CONTENTS = 0x7
    EV_S_CRTM_VERSION = 0x8
    EV_CPU_MICROCODE = 0x9
    EV_PLATFORM_CONFIG_FLAGS = 0xA
    EV_TABLE_OF_DEVICES = 0xB
    EV_COMPACT_HASH = 0xC
    EV_IPL = 0xD
    EV_IPL_PARTITION_DATA = 0xE
    EV_NONHOST_CODE = 0xF
    EV_NONHOST_CONFIG = 0x10
    EV_NONHOST_INFO = 0x11
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x12
    EV_POST_CODE2 = 0x13
    EV_EFI_EVENT_BASE = 0x80000000
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
    EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
    EV_EFI_GPT_EVENT = 0x80000006
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_HANDOFF_TABLES = 0x80000009
    EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
    EV_EFI_HANDOFF_TABLES2 = 0x8000000B
    EV_EFI_VARIABLE_BOOT2 = 0x8000000C
    EV_EFI_GPT_EVENT2 = 0x8000000D
    EV_EFI_HCRTM_EVENT = 0x80000010
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
    EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
    EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2
    EV_EFI_SPDM_DEVICE_POLICY = 0x800000E3
    EV_EFI_SPDM_DEVICE_AUTHORITY = 0x800000E4


EFI_GLOBAL_VARIABLE_GUID = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE_GUID = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
SHIM_LOCK_GUID = uuid.UUID("605dab50-e046-4300-abb6-3dd810dd8b23")
EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256_GUID = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")

_SIGNATURE_TYPES = {EFI_CERT_X509_GUID: "X509", EFI_CERT_SHA256_GUID: "SHA256"}
_SIGNATURE_DB_NAMES = frozenset({"PK", "KEK", "db", "dbx", "dbt", "dbr"})
_SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
_STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"
_SUMMARY_LIMIT = 120


def printable(text: str, limit: int = _SUMMARY_LIMIT) -> str:
    """``text`` with control characters escaped and cut to ``limit`` characters.

    Payload text comes from an untrusted log: it must never reach a terminal raw (escape
    sequences), and a 1 MB "string" must not flood a table.
    """
    out = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
        for ch in text[: limit + 1]
    )
    return out if len(out) <= limit else out[: limit - 1] + "…"


def quoted(text: str, limit: int = _SUMMARY_LIMIT) -> str:
    """``text`` made :func:`printable`, in single quotes, for one-line summaries."""
    return f"'{printable(text, limit)}'"


def _guid(r: Reader, what: str) -> uuid.UUID:
    return uuid.UUID(bytes_le=r.take(16, what))


def _utf16z(raw: bytes) -> str:
    """Decode UTF-16LE and cut at the first NUL (strings in payloads are often NUL-terminated)."""
    text = raw.decode("utf-16-le")
    nul = text.find("\x00")
    return text if nul < 0 else text[:nul]


# --- SpecID (structural: parsed by the log parser, raises) ------------------------------------


@dataclass(frozen=True)
class SpecIdAlgorithm:
    """One row of the SpecID digest table: ``TCG_EfiSpecIdEventAlgorithmSize``."""

    alg_id: int
    name: str
    digest_size: int


@dataclass(frozen=True)
class SpecIdEvent:
    """``TCG_EfiSpecIDEventStruct`` (PFP 1.05), the first record of a crypto-agile log."""

    platform_class: int
    spec_version_minor: int
    spec_version_major: int
    spec_errata: int
    uintn_size: int
    algorithms: tuple[SpecIdAlgorithm, ...]
    vendor_info: bytes

    def summary(self) -> str:
        algs = ", ".join(f"{a.name}({a.digest_size})" for a in self.algorithms)
        version = f"{self.spec_version_major}.{self.spec_version_minor}.{self.spec_errata}"
        text = f"Spec ID Event03 v{version} algorithms: {algs}"
        if self.vendor_info:
            text += f" vendorInfo={self.vendor_info.hex()}"
        return text


def is_spec_id_event03(data: bytes) -> bool:
    """Whether ``data`` starts with the ``"Spec ID Event03\\0"`` signature."""
    return data.startswith(_SPEC_ID_SIGNATURE)


# --- payload types --------------------------------------------------------------------------


@dataclass(frozen=True)
class StartupLocality:
    """EV_NO_ACTION ``"StartupLocality\\0"`` + u8 (PFP 1.05): PCR0's initial locality."""

    locality: int

    def summary(self) -> str:
        return f"StartupLocality {self.locality}"


@dataclass(frozen=True)
class NoActionEvent:
    """Another EV_NO_ACTION payload (SP800-155 events, vendor records): signature and the rest."""

    signature: str
    body: bytes

    def summary(self) -> str:
        return f"{quoted(self.signature)} ({len(self.body)} bytes)"


@dataclass(frozen=True)
class TextEvent:
    """A string payload: EV_EFI_ACTION, EV_ACTION, EV_S_CRTM_VERSION, EV_IPL, EV_POST_CODE…

    ``encoding`` is how it was decoded (``"ascii"``, ``"utf-8"``, ``"utf-16-le"``).
    """

    text: str
    encoding: str

    def summary(self) -> str:
        return quoted(self.text)


@dataclass(frozen=True)
class SeparatorEvent:
    """EV_SEPARATOR: a 4-byte value, 0 for the normal separator (PFP 1.05)."""

    value: int

    def summary(self) -> str:
        return f"separator 0x{self.value:08x}"


@dataclass(frozen=True)
class PlatformFirmwareBlob:
    """``UEFI_PLATFORM_FIRMWARE_BLOB`` (``description`` only for ``..._BLOB2``)."""

    base: int
    length: int
    description: str | None = None

    def summary(self) -> str:
        text = f"blob base=0x{self.base:x} length=0x{self.length:x}"
        if self.description is not None:
            text = f"{quoted(self.description)} " + text
        return text


@dataclass(frozen=True)
class DevicePath:
    """An ``EFI_DEVICE_PATH_PROTOCOL`` list: raw bytes plus a UEFI-style text rendering.

    ``text`` follows the UEFI 2.10 §10.6 conversion, as efivar 39 prints it (the renderings in
    tpm2-tools' ``event-pretty-39`` fixtures); unknown nodes print as ``Path(type,subtype,hex)``.

    ``file_path`` joins the FILEPATH_DEVICE_PATH nodes (``\\EFI\\BOOT\\BOOTX64.EFI``), if any.
    """

    raw: bytes
    text: str
    file_path: str | None

    def summary(self) -> str:
        return printable(self.file_path or self.text or "(no device path)")


@dataclass(frozen=True)
class EfiImageLoad:
    """``UEFI_IMAGE_LOAD_EVENT`` (PFP 1.05): EV_EFI_BOOT_SERVICES_* and RUNTIME drivers.

    ``trailing`` holds bytes after the device path: shim's and some firmware's events carry them
    (go-tpm-tools ``debian-10.bin``, ``rhel8-uefi.bin``); they are kept, not an error.
    """

    image_location_in_memory: int
    image_length_in_memory: int
    image_link_time_address: int
    device_path: DevicePath
    trailing: bytes = b""

    def summary(self) -> str:
        return f"{self.device_path.summary()} ({self.image_length_in_memory} bytes)"


@dataclass(frozen=True)
class EfiSignature:
    """One ``EFI_SIGNATURE_DATA`` with its list's ``SignatureType``."""

    signature_type: uuid.UUID
    owner: uuid.UUID
    data: bytes

    @property
    def type_name(self) -> str:
        return _SIGNATURE_TYPES.get(self.signature_type, str(self.signature_type))


@dataclass(frozen=True)
class EfiLoadOption:
    """``EFI_LOAD_OPTION`` (UEFI 2.10 §3.1.3), the value of a ``Boot####`` variable."""

    attributes: int
    description: str
    device_path: DevicePath
    optional_data: bytes


@dataclass(frozen=True)
class EfiVariable:
    """``UEFI_VARIABLE_DATA`` (PFP 1.05) with a decoded value for well-known variables.

    ``known`` names a recognised variable (``SecureBoot``, ``PK``, ``KEK``, ``db``, ``dbx``,
    ``BootOrder``, ``Boot####``, shim's ``MokList``…), ``None`` otherwise. ``secure_boot``,
    ``boot_order``, ``load_option`` and ``signatures`` hold the decoded value where it applies.
    ``trailing`` holds bytes after VariableData (shim adds some to EV_EFI_VARIABLE_AUTHORITY).
    """

    guid: uuid.UUID
    name: str
    data: bytes
    trailing: bytes = b""
    known: str | None = None
    secure_boot: bool | None = None
    boot_order: tuple[int, ...] | None = None
    load_option: EfiLoadOption | None = None
    signatures: tuple[EfiSignature, ...] | None = None

    def summary(self) -> str:
        head = printable(self.name, 40)
        if self.secure_boot is not None:
            return f"{head} = {'enabled' if self.secure_boot else 'disabled'}"
        if self.boot_order is not None:
            return f"{head} = " + ",".join(f"Boot{n:04X}" for n in self.boot_order)
        if self.load_option is not None:
            opt = self.load_option
            return f"{head} = {quoted(opt.description, 40)} {opt.device_path.summary()}"
        if self.signatures is not None:
            counts: dict[str, int] = {}
            for sig in self.signatures:
                counts[sig.type_name] = counts.get(sig.type_name, 0) + 1
            listed = ", ".join(f"{n} {t}" for t, n in counts.items()) or "empty"
            return f"{head}: {listed}"
        return f"{head} ({len(self.data)} bytes)"


@dataclass(frozen=True)
class GptPartition:
    """One ``EFI_PARTITION_ENTRY`` (UEFI 2.10 §5.3.3)."""

    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str


@dataclass(frozen=True)
class EfiGptEvent:
    """``UEFI_GPT_DATA`` (PFP 1.05): the GPT header and the partitions in use."""

    disk_guid: uuid.UUID
    header_revision: int
    partitions: tuple[GptPartition, ...]

    def summary(self) -> str:
        names = ", ".join(printable(p.name, 24) or "-" for p in self.partitions)
        return f"GPT disk {self.disk_guid}: {len(self.partitions)} partitions ({names})"


@dataclass(frozen=True)
class EfiHandoffTables:
    """``UEFI_HANDOFF_TABLE_POINTERS``: the configuration tables handed to the OS."""

    tables: tuple[tuple[uuid.UUID, int], ...]

    def summary(self) -> str:
        return f"{len(self.tables)} configuration tables"


EventPayload = (
    SpecIdEvent
    | StartupLocality
    | NoActionEvent
    | TextEvent
    | SeparatorEvent
    | PlatformFirmwareBlob
    | EfiImageLoad
    | EfiVariable
    | EfiGptEvent
    | EfiHandoffTables
)


# --- device paths ---------------------------------------------------------------------------

_ACPI_HIDS = {0x0A0341D0: "PciRoot", 0x0A0841D0: "PcieRoot"}
_MAX_DEVICE_PATH_NODES = 256


def _ipv4(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


def _node_text(node_type: int, sub: int, body: bytes) -> tuple[str, str | None]:
    """Text for one device-path node, plus the file path if it is a FILEPATH node."""
    r = Reader(body)
    if node_type == 1 and sub == 1 and len(body) == 2:
        func, dev = body[0], body[1]
        return f"Pci(0x{dev:x},0x{func:x})", None
    if node_type == 1 and sub == 4 and len(body) >= 16:
        return f"VenHw({_guid(r, 'VENDOR_DEVICE_PATH.Guid')})", None
    if node_type == 2 and sub == 1 and len(body) == 8:
        hid, uid = r.u32le("ACPI_HID_DEVICE_PATH.HID"), r.u32le("ACPI_HID_DEVICE_PATH.UID")
        name = _ACPI_HIDS.get(hid)
        return (f"{name}(0x{uid:x})" if name else f"Acpi(0x{hid:08x},0x{uid:x})"), None
    if node_type == 3:
        if sub == 2 and len(body) == 4:
            return f"SCSI({r.u16le('pun')},{r.u16le('lun')})", None
        if sub == 5 and len(body) == 2:
            return f"USB(0x{body[0]:x},0x{body[1]:x})", None
        if sub == 0x0B and len(body) == 33:
            return f"MAC({body[:6].hex()},{body[32]})", None
        if sub == 0x0C and len(body) == 23:
            local, remote = _ipv4(body[0:4]), _ipv4(body[4:8])
            r.skip(12, "IPv4_DEVICE_PATH addresses and ports")
            protocol = r.u16le("IPv4_DEVICE_PATH.Protocol")
            kind = "Static" if r.u8("IPv4_DEVICE_PATH.StaticIpAddress") else "DHCP"
            gateway, mask = _ipv4(body[15:19]), _ipv4(body[19:23])
            return f"IPv4({remote},{protocol},{kind},{local},{gateway},{mask})", None
        if sub == 0x12 and len(body) == 6:
            hba, pm, lun = r.u16le("hba"), r.u16le("pm"), r.u16le("lun")
            return f"Sata({hba},{pm},{lun})", None
        if sub == 0x17 and len(body) == 12:
            return f"NVMe(0x{r.u32le('nsid'):x},{body[4:].hex()})", None
        if sub == 0x0A and len(body) >= 16:
            return f"VenMsg({_guid(r, 'VENDOR_DEVICE_PATH.Guid')})", None
        if sub == 0x18:
            return f"Uri({body.decode('ascii', 'backslashreplace')})", None
    if node_type == 4:
        if sub == 1 and len(body) == 38:
            part, start, size = r.u32le("part"), r.u64le("start"), r.u64le("size")
            sig = r.take(16, "HARDDRIVE_DEVICE_PATH.Signature")
            fmt, sig_type = r.u8("MBRType"), r.u8("SignatureType")
            if fmt == 2 and sig_type == 2:
                sig_text = f"GPT,{uuid.UUID(bytes_le=sig)}"
            elif sig_type == 1:
                sig_text = f"MBR,0x{int.from_bytes(sig[:4], 'little'):08x}"
            else:
                sig_text = f"{fmt},{sig.hex()}"
            return f"HD({part},{sig_text},0x{start:x},0x{size:x})", None
        if sub == 4:
            path = _utf16z(body)
            return path, path
        if sub == 6 and len(body) == 16:
            return f"FvFile({_guid(r, 'MEDIA_FW_VOL_FILEPATH.Guid')})", None
        if sub == 7 and len(body) == 16:
            return f"Fv({_guid(r, 'MEDIA_FW_VOL.Guid')})", None
        if sub == 8 and len(body) == 20:
            r.skip(4, "Reserved")
            return f"Offset(0x{r.u64le('start'):x},0x{r.u64le('end'):x})", None
    return f"Path({node_type},{sub},{body.hex()})", None


def decode_device_path(raw: bytes, *, base: int = 0) -> DevicePath:
    """Decode an ``EFI_DEVICE_PATH_PROTOCOL`` list (UEFI 2.10 §10.3).

    Raises:
        ParseError: a node shorter than its 4-byte header or running past the end.
    """
    r = Reader(raw, base=base)
    parts: list[str] = []
    files: list[str] = []
    for _ in range(_MAX_DEVICE_PATH_NODES):
        if r.at_end():
            break
        node_type = r.u8("EFI_DEVICE_PATH_PROTOCOL.Type")
        sub = r.u8("EFI_DEVICE_PATH_PROTOCOL.SubType")
        at = r.offset
        length = r.u16le("EFI_DEVICE_PATH_PROTOCOL.Length")
        if length < 4:
            raise ParseError("EFI_DEVICE_PATH_PROTOCOL.Length", at, "at least 4", str(length))
        body = r.take(length - 4, "EFI_DEVICE_PATH_PROTOCOL data")
        if node_type == 0x7F:
            if sub == 0xFF:
                break
            parts.append(",")
            continue
        text, file_path = _node_text(node_type, sub, body)
        parts.append(text)
        if file_path is not None:
            files.append(file_path)
    else:
        raise ParseError("EFI_DEVICE_PATH_PROTOCOL", r.offset, "at most 256 nodes")
    text = "/".join(parts).replace("/,/", ",")
    file_text = "/".join(files).replace("\\/", "\\") if files else None
    return DevicePath(raw=raw, text=text, file_path=file_text)


# --- per-type decoders ----------------------------------------------------------------------


def _decode_image_load(data: bytes) -> EfiImageLoad:
    r = Reader(data)
    location = r.u64le("UEFI_IMAGE_LOAD_EVENT.ImageLocationInMemory")
    length = r.u64le("UEFI_IMAGE_LOAD_EVENT.ImageLengthInMemory")
    link = r.u64le("UEFI_IMAGE_LOAD_EVENT.ImageLinkTimeAddress")
    path_len = r.u64le("UEFI_IMAGE_LOAD_EVENT.LengthOfDevicePath")
    at = r.offset
    path = r.take(path_len, "UEFI_IMAGE_LOAD_EVENT.DevicePath")
    path_text = decode_device_path(path, base=at)
    return EfiImageLoad(location, length, link, path_text, r.rest())


def _decode_signature_lists(data: bytes) -> tuple[EfiSignature, ...]:
    r = Reader(data)
    out: list[EfiSignature] = []
    while not r.at_end():
        start = r.offset
        sig_type = _guid(r, "EFI_SIGNATURE_LIST.SignatureType")
        list_size = r.u32le("EFI_SIGNATURE_LIST.SignatureListSize")
        header_size = r.u32le("EFI_SIGNATURE_LIST.SignatureHeaderSize")
        sig_size = r.u32le("EFI_SIGNATURE_LIST.SignatureSize")
        body_size = list_size - 28 - header_size
        if sig_size < 16 or body_size < 0 or body_size % sig_size:
            raise ParseError(
                "EFI_SIGNATURE_LIST",
                start,
                "SignatureListSize = 28 + SignatureHeaderSize + n * SignatureSize (>= 16)",
                f"list {list_size}, header {header_size}, signature {sig_size}",
            )
        r.skip(header_size, "EFI_SIGNATURE_LIST.SignatureHeader")
        body = r.sub(body_size, "EFI_SIGNATURE_LIST.Signatures")
        while not body.at_end():
            owner = _guid(body, "EFI_SIGNATURE_DATA.SignatureOwner")
            out.append(EfiSignature(sig_type, owner, body.take(sig_size - 16, "SignatureData")))
    return tuple(out)


def _decode_load_option(data: bytes) -> EfiLoadOption:
    r = Reader(data)
    attributes = r.u32le("EFI_LOAD_OPTION.Attributes")
    path_len = r.u16le("EFI_LOAD_OPTION.FilePathListLength")
    chars: list[bytes] = []
    while True:
        ch = r.take(2, "EFI_LOAD_OPTION.Description")
        if ch == b"\x00\x00":
            break
        chars.append(ch)
    description = b"".join(chars).decode("utf-16-le")
    at = r.offset
    path = decode_device_path(r.take(path_len, "EFI_LOAD_OPTION.FilePathList"), base=at)
    return EfiLoadOption(attributes, description, path, r.rest())


def _decode_variable(event_type: int, data: bytes) -> EfiVariable:
    r = Reader(data)
    guid = _guid(r, "UEFI_VARIABLE_DATA.VariableName")
    name_len = r.u64le("UEFI_VARIABLE_DATA.UnicodeNameLength")
    data_len = r.u64le("UEFI_VARIABLE_DATA.VariableDataLength")
    if name_len > r.remaining // 2:
        raise ParseError(
            "UEFI_VARIABLE_DATA.UnicodeName", r.offset, f"{name_len} UTF-16 characters"
        )
    name = r.take(name_len * 2, "UEFI_VARIABLE_DATA.UnicodeName").decode("utf-16-le")
    value = r.take(data_len, "UEFI_VARIABLE_DATA.VariableData")
    var = EfiVariable(guid=guid, name=name, data=value, trailing=r.rest())
    measured_value = event_type in (
        EventType.EV_EFI_VARIABLE_DRIVER_CONFIG,
        EventType.EV_EFI_VARIABLE_BOOT,
        EventType.EV_EFI_VARIABLE_BOOT2,
    )
    if guid == EFI_GLOBAL_VARIABLE_GUID:
        if name == "SecureBoot":
            secure = value[0] == 1 if len(value) == 1 else None
            return replace(var, known=name, secure_boot=secure)
        if name in ("PK", "KEK"):
            sigs = _decode_signature_lists(value) if measured_value else None
            return replace(var, known=name, signatures=sigs)
        if name == "BootOrder":
            if len(value) % 2:
                raise ParseError("BootOrder", 0, "an even number of bytes", str(len(value)))
            order = tuple(struct.unpack(f"<{len(value) // 2}H", value))
            return replace(var, known=name, boot_order=order)
        if len(name) == 8 and name.startswith("Boot") and _is_hex(name[4:]):
            # EV_EFI_VARIABLE_BOOT of Boot#### may hold the load option or only its digest.
            option = _decode_load_option(value) if len(value) >= 8 else None
            return replace(var, known="Boot####", load_option=option)
    if guid == EFI_IMAGE_SECURITY_DATABASE_GUID and name in _SIGNATURE_DB_NAMES:
        if measured_value:
            return replace(var, known=name, signatures=_decode_signature_lists(value))
        # EV_EFI_VARIABLE_AUTHORITY: the one EFI_SIGNATURE_DATA that authorised an image
        # (PFP 1.05); a DER certificate when it starts with a SEQUENCE.
        if len(value) > 18 and value[16] == 0x30:
            owner = uuid.UUID(bytes_le=value[:16])
            sig = EfiSignature(EFI_CERT_X509_GUID, owner, value[16:])
            return replace(var, known=name, signatures=(sig,))
        return replace(var, known=name)
    if guid == SHIM_LOCK_GUID and name.startswith(("Mok", "Sbat")):
        return replace(var, known=name)
    return var


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def _decode_gpt(data: bytes) -> EfiGptEvent:
    r = Reader(data)
    signature = r.take(8, "UEFI_PARTITION_TABLE_HEADER.Signature")
    if signature != b"EFI PART":
        raise ParseError("UEFI_PARTITION_TABLE_HEADER.Signature", 0, "'EFI PART'", repr(signature))
    revision = r.u32le("Revision")
    r.skip(4 + 4 + 4 + 8 + 8 + 8 + 8, "UEFI_PARTITION_TABLE_HEADER fields")
    disk_guid = _guid(r, "UEFI_PARTITION_TABLE_HEADER.DiskGUID")
    r.skip(8 + 4, "PartitionEntryLBA, NumberOfPartitionEntries")
    entry_size = r.u32le("UEFI_PARTITION_TABLE_HEADER.SizeOfPartitionEntry")
    r.skip(4, "PartitionEntryArrayCRC32")
    count = r.u64le("UEFI_GPT_DATA.NumberOfPartitions")
    if entry_size < 128 or count * entry_size != r.remaining:
        raise ParseError(
            "UEFI_GPT_DATA.Partitions",
            r.offset,
            f"NumberOfPartitions * SizeOfPartitionEntry (>= 128) = {r.remaining} bytes",
            f"{count} * {entry_size}",
        )
    parts: list[GptPartition] = []
    for _ in range(count):
        e = r.sub(entry_size, "EFI_PARTITION_ENTRY")
        type_guid = _guid(e, "PartitionTypeGUID")
        unique = _guid(e, "UniquePartitionGUID")
        first, last, attrs = e.u64le("StartingLBA"), e.u64le("EndingLBA"), e.u64le("Attributes")
        name = _utf16z(e.take(72, "PartitionName"))
        parts.append(GptPartition(type_guid, unique, first, last, attrs, name))
    return EfiGptEvent(disk_guid, revision, tuple(parts))


def _decode_text(data: bytes) -> TextEvent:
    """ASCII/UTF-8, or UTF-16LE when the bytes look like it; a trailing NUL is dropped."""
    # sd-boot logs UTF-16 plus one NUL byte (tpm2-tools event-arch-linux.bin, event 24).
    even = data[:-1] if len(data) % 2 and data.endswith(b"\x00") else data
    if len(even) >= 2 and len(even) % 2 == 0 and even[1] == 0 and even[0] != 0:
        return TextEvent(_utf16z(even), "utf-16-le")
    text = data.rstrip(b"\x00")
    try:
        return TextEvent(text.decode("ascii"), "ascii")
    except UnicodeDecodeError:
        return TextEvent(text.decode("utf-8"), "utf-8")


def _decode_no_action(data: bytes) -> StartupLocality | NoActionEvent:
    if data.startswith(_STARTUP_LOCALITY_SIGNATURE):
        if len(data) != 17:
            raise ParseError("StartupLocality", 16, "17 bytes", f"{len(data)} bytes")
        return StartupLocality(data[16])
    sig = data[:16]
    nul = sig.find(b"\x00")
    name = (sig if nul < 0 else sig[:nul]).decode("ascii", "backslashreplace")
    return NoActionEvent(name, data[16:])


def _decode_blob(event_type: int, data: bytes) -> PlatformFirmwareBlob:
    r = Reader(data)
    description = None
    if event_type == EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2:
        n = r.u8("UEFI_PLATFORM_FIRMWARE_BLOB2.BlobDescriptionSize")
        description = r.take(n, "BlobDescription").decode("ascii", "backslashreplace")
    base, length = r.u64le("BlobBase"), r.u64le("BlobLength")
    r.expect_end("UEFI_PLATFORM_FIRMWARE_BLOB")
    return PlatformFirmwareBlob(base, length, description)


def _decode_handoff(data: bytes) -> EfiHandoffTables:
    r = Reader(data)
    count = r.u64le("UEFI_HANDOFF_TABLE_POINTERS.NumberOfTables")
    if count * 24 != r.remaining:
        raise ParseError(
            "UEFI_HANDOFF_TABLE_POINTERS", 8, f"{r.remaining // 24} tables", str(count)
        )
    tables = tuple((_guid(r, "VendorGuid"), r.u64le("VendorTable")) for _ in range(count))
    return EfiHandoffTables(tables)


_IMAGE_TYPES = frozenset(
    {
        EventType.EV_EFI_BOOT_SERVICES_APPLICATION,
        EventType.EV_EFI_BOOT_SERVICES_DRIVER,
        EventType.EV_EFI_RUNTIME_SERVICES_DRIVER,
    }
)
_VARIABLE_TYPES = frozenset(
    {
        EventType.EV_EFI_VARIABLE_DRIVER_CONFIG,
        EventType.EV_EFI_VARIABLE_BOOT,
        EventType.EV_EFI_VARIABLE_BOOT2,
        EventType.EV_EFI_VARIABLE_AUTHORITY,
    }
)
_TEXT_TYPES = frozenset(
    {
        EventType.EV_EFI_ACTION,
        EventType.EV_ACTION,
        EventType.EV_S_CRTM_VERSION,
        EventType.EV_IPL,
        EventType.EV_EFI_HCRTM_EVENT,
        EventType.EV_OMIT_BOOT_DEVICE_EVENTS,
    }
)


def decode_payload(event_type: int, data: bytes) -> tuple[EventPayload | None, str | None]:
    """Decode the payload of an event of ``event_type``; never raises for bad content.

    Returns:
        ``(payload, None)`` when decoded; ``(None, None)`` for types carried as opaque bytes;
        ``(None, problem)`` when the bytes do not fit the structure the type promises.
    """
    try:
        if event_type == EventType.EV_NO_ACTION:
            return _decode_no_action(data), None
        if event_type in _IMAGE_TYPES:
            return _decode_image_load(data), None
        if event_type in _VARIABLE_TYPES:
            return _decode_variable(event_type, data), None
        if event_type in (EventType.EV_EFI_GPT_EVENT, EventType.EV_EFI_GPT_EVENT2):
            return _decode_gpt(data), None
        if event_type == EventType.EV_SEPARATOR:
            if len(data) != 4:
                return None, f"EV_SEPARATOR: expected 4 bytes, got {len(data)}"
            return SeparatorEvent(int.from_bytes(data, "little")), None
        if event_type in (
            EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB,
            EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2,
        ):
            return _decode_blob(event_type, data), None
        if event_type == EventType.EV_POST_CODE:
            # PFP 1.05: a firmware blob (16 bytes) or an ASCII description.
            if len(data) == 16:
                return _decode_blob(event_type, data), None
            return _decode_text(data), None
        if event_type == EventType.EV_EFI_HANDOFF_TABLES:
            return _decode_handoff(data), None
        if event_type == EventType.EV_S_CRTM_VERSION:
            # PFP 1.05: a UTF-16 version string, or a GUID when there is no string;
            # TPM 1.2 era BIOSes log a binary version (go-attestation option_rom_eventlog).
            try:
                return _decode_text(data), None
            except UnicodeDecodeError:
                if len(data) == 16:
                    return TextEvent(str(uuid.UUID(bytes_le=data)), "guid"), None
                return None, None
        if event_type in _TEXT_TYPES:
            return _decode_text(data), None
    except ParseError as err:
        return None, f"{_type_name(event_type)}: {err}"
    except UnicodeDecodeError as err:
        return None, f"{_type_name(event_type)}: undecodable text ({err.reason} at {err.start})"
    return None, None


def _type_name(event_type: int) -> str:
    try:
        return EventType(event_type).name
    except ValueError:
        return f"0x{event_type:08x}"

"""Pure transforms of libvirt domain XML: adopt an existing domain, or describe a new one.

:func:`adopt_domain_xml` rewrites a persistent domain definition so the host agent can stand
behind its vTPM and read its memory (ARCHITECTURE.md §3, "VM adoption"):

- guest RAM is a shared memfd: ``<memoryBacking><source type='memfd'/><access mode='shared'/>``
  (the agent maps it read-only, "Guest memory as seen from the host" in platform-notes.md);
- the TPM is ``<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect'
  path=BRIDGE/></backend></tpm>``: QEMU talks to the VM's bridge, which talks to the VM's swtpm
  (a domain that had ``tpm-tis`` keeps that model);
- a virtio-serial channel ``<channel type='unix'><source mode='bind' path=CHANNEL/><target
  type='virtio' name=NAME/></channel>`` carries the guest's attestation requests;
- ``<features><acpi/>`` is on (without it libvirt passes ``-no-acpi`` and the guest finds no CRB);
- ``<metadata><vtpm:adopted …/>`` records the adoption in the definition itself.

Adopting an adopted domain gives the same XML (idempotent). What cannot be adopted is refused
with :class:`UnadoptableDomain` naming the element and what would change the outcome; malformed
XML is :class:`DomainXmlError`. Nothing here does I/O: XML text in, XML text out.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import ClassVar
from xml.sax.saxutils import escape

from evidence.errors import ParseError, VtpmError

__all__ = [
    "ADOPTION_NS",
    "DEFAULT_CHANNEL_NAME",
    "DomainDescription",
    "DomainXmlError",
    "UnadoptableDomain",
    "adopt_domain_xml",
    "describe_domain_xml",
    "domain_xml_for_image",
]

#: The virtio-serial port name the guest agent opens (``/dev/virtio-ports/<name>``).
DEFAULT_CHANNEL_NAME = "org.vtpm-trust.attest.0"
#: Namespace of our ``<metadata>`` element.
ADOPTION_NS = "https://vtpm-trust.org/xmlns/libvirt/adoption/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

ET.register_namespace("vtpm", ADOPTION_NS)
ET.register_namespace("qemu", QEMU_NS)

_TPM_MODELS = ("tpm-crb", "tpm-tis")
_HYPERVISORS = ("qemu", "kvm")
_UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


class DomainXmlError(ParseError):
    """The domain XML is not well-formed, or is not a ``<domain>`` document."""

    id: ClassVar[str] = "parse.domain_xml"


class UnadoptableDomain(VtpmError):
    """A well-formed domain the agent cannot take over as it is.

    Args:
        domain: the domain's name (or ``"?"``).
        reason: what stands in the way and what would change the outcome.
    """

    id: ClassVar[str] = "lifecycle.domain.unadoptable"

    def __init__(self, domain: str, reason: str) -> None:
        self.domain = domain
        self.reason = reason
        super().__init__(f"domain {domain!r} cannot be adopted: {reason}")


@dataclass(frozen=True)
class DomainDescription:
    """What the agent needs to know of a domain definition (read, not checked).

    Attributes:
        name, uuid: the domain's identity (uuid may be None in XML not yet defined).
        tpm_model: ``tpm-crb``, ``tpm-tis``… or None without a TPM.
        tpm_backend: ``emulator``, ``external``, ``passthrough``… or None.
        tpm_version: the emulator backend's ``version`` attribute, if given.
        external_tpm_path: the external backend's socket path, if any.
        adopted: the definition carries our adoption metadata.
        bridge_socket, channel_socket, channel_name: from the adoption metadata.
        memfd_shared: guest RAM is a shared memfd.
    """

    name: str
    uuid: str | None
    tpm_model: str | None
    tpm_backend: str | None
    tpm_version: str | None
    external_tpm_path: str | None
    adopted: bool
    bridge_socket: str | None
    channel_socket: str | None
    channel_name: str | None
    memfd_shared: bool


# ---------------------------------------------------------------------------- parsing


def _parse(xml: str) -> ET.Element:
    if not isinstance(xml, str):
        raise TypeError(f"domain XML must be str, got {type(xml).__name__}")
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", xml, re.IGNORECASE):
        raise DomainXmlError(
            "domain XML", 0, "no DOCTYPE or ENTITY declarations", "a declaration", unit="line"
        )
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        line = err.position[0] if err.position else 0
        raise DomainXmlError("domain XML", line, "well-formed XML", str(err), unit="line") from err
    if root.tag != "domain":
        raise DomainXmlError(
            "domain XML", 1, "a <domain> root element", f"<{root.tag}>", unit="line"
        )
    return root


def _name(root: ET.Element) -> str:
    return (root.findtext("name") or "").strip() or "?"


def _q(value: str) -> str:
    """``value`` escaped for an XML attribute in single quotes."""
    return escape(value, {"'": "&apos;", '"': "&quot;"})


def _check_path(what: str, path: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"{what} must be an absolute path, got {path!r}")
    if len(path.encode()) > _UNIX_PATH_MAX:
        raise ValueError(
            f"{what} {path!r} is longer than a unix socket path may be ({_UNIX_PATH_MAX} bytes)"
        )


def describe_domain_xml(xml: str) -> DomainDescription:
    """Read what the agent needs from a domain definition.

    Raises:
        DomainXmlError: malformed XML or not a ``<domain>``.
    """
    root = _parse(xml)
    tpm = root.find("devices/tpm")
    backend = tpm.find("backend") if tpm is not None else None
    source = backend.find("source") if backend is not None else None
    meta = root.find(f"metadata/{{{ADOPTION_NS}}}adopted")
    mb = root.find("memoryBacking")
    memfd = (
        mb is not None
        and mb.find("source") is not None
        and mb.find("source").get("type") == "memfd"  # type: ignore[union-attr]
        and mb.find("access") is not None
        and mb.find("access").get("mode") == "shared"  # type: ignore[union-attr]
    )
    return DomainDescription(
        name=_name(root),
        uuid=(root.findtext("uuid") or "").strip() or None,
        tpm_model=tpm.get("model") if tpm is not None else None,
        tpm_backend=backend.get("type") if backend is not None else None,
        tpm_version=backend.get("version") if backend is not None else None,
        external_tpm_path=(
            source.get("path")
            if source is not None and backend is not None and backend.get("type") == "external"
            else None
        ),
        adopted=meta is not None,
        bridge_socket=meta.get("bridge") if meta is not None else None,
        channel_socket=meta.get("channel") if meta is not None else None,
        channel_name=meta.get("channel-name") if meta is not None else None,
        memfd_shared=bool(memfd),
    )


# ---------------------------------------------------------------------------- adoption


def _child(parent: ET.Element, tag: str, *, after: tuple[str, ...] = ()) -> ET.Element:
    """``parent``'s first ``tag`` child, created (after the last of ``after``, else at the end)."""
    found = parent.find(tag)
    if found is not None:
        return found
    elem = ET.Element(tag)
    index = len(parent)
    for i, c in enumerate(parent):
        if c.tag in after:
            index = i + 1
    parent.insert(index, elem)
    return elem


def _set_only_child(parent: ET.Element, tag: str, attrs: dict[str, str]) -> None:
    """Exactly one ``tag`` child of ``parent`` with exactly ``attrs``."""
    existing = parent.findall(tag)
    for extra in existing[1:]:
        parent.remove(extra)
    elem = existing[0] if existing else ET.SubElement(parent, tag)
    if dict(elem.attrib) != attrs:
        elem.attrib.clear()
        elem.attrib.update(attrs)
    for c in list(elem):
        elem.remove(c)


def _adopt_memory(domain: str, root: ET.Element) -> None:
    mb = root.find("memoryBacking")
    if mb is not None:
        if mb.find("hugepages") is not None:
            raise UnadoptableDomain(
                domain,
                "<memoryBacking><hugepages> cannot be combined with the shared memfd the agent "
                "reads guest memory from; remove <hugepages> (memfd hugepages are not supported "
                "by the agent yet)",
            )
        src = mb.find("source")
        if src is not None and src.get("type") not in (None, "anonymous", "memfd"):
            raise UnadoptableDomain(
                domain,
                f"<memoryBacking><source type='{src.get('type')}'> backs guest RAM with a "
                "file; the agent needs type='memfd' (remove the <source> element to let the "
                "agent set it)",
            )
    for cell in root.findall("cpu/numa/cell"):
        if cell.get("memAccess") == "private":
            raise UnadoptableDomain(
                domain,
                f"NUMA cell {cell.get('id', '?')} has memAccess='private'; the agent needs "
                "shared guest memory (remove memAccess or set it to 'shared')",
            )
    for dev in root.findall("devices/memory"):
        raise UnadoptableDomain(
            domain,
            f"<memory model='{dev.get('model', '?')}'> devices add RAM outside the memfd the "
            "agent hashes; remove them",
        )
    mb = _child(root, "memoryBacking", after=("currentMemory", "memory", "maxMemory"))
    _set_only_child(mb, "source", {"type": "memfd"})
    _set_only_child(mb, "access", {"mode": "shared"})


def _adopt_tpm(domain: str, root: ET.Element, devices: ET.Element, bridge_socket: str) -> None:
    tpms = devices.findall("tpm")
    if len(tpms) > 1:
        raise UnadoptableDomain(
            domain, f"it has {len(tpms)} <tpm> devices; the agent serves exactly one vTPM"
        )
    model = "tpm-crb"
    tpm: ET.Element | None = tpms[0] if tpms else None
    if tpm is not None:
        model = tpm.get("model") or "tpm-tis"  # libvirt's default model
        if model not in _TPM_MODELS:
            raise UnadoptableDomain(
                domain,
                f"<tpm model='{model}'> is not supported; the agent serves tpm-crb or tpm-tis",
            )
        backend = tpm.find("backend")
        kind = backend.get("type") if backend is not None else None
        if kind == "passthrough":
            raise UnadoptableDomain(
                domain,
                "its TPM passes the host's TPM through (<backend type='passthrough'>); a VM "
                "must not use the host TPM directly, remove that <tpm> first",
            )
        if kind == "emulator":
            assert backend is not None
            version = backend.get("version")
            if version not in (None, "2.0"):
                raise UnadoptableDomain(
                    domain,
                    f"its emulated TPM is version {version}; the agent serves TPM 2.0 only "
                    "(a TPM 1.2 state cannot be carried over)",
                )
        elif kind == "external":
            assert backend is not None
            source = backend.find("source")
            path = source.get("path") if source is not None else None
            if path != bridge_socket:
                raise UnadoptableDomain(
                    domain,
                    f"its TPM already uses an external backend at {path!r}, not this VM's "
                    f"bridge {bridge_socket!r}; remove that <tpm> to let the agent serve it",
                )
        elif kind is not None:
            raise UnadoptableDomain(
                domain, f"<tpm><backend type='{kind}'> is not supported by the agent"
            )
    else:
        tpm = ET.SubElement(devices, "tpm")
    tpm.attrib.clear()
    tpm.set("model", model)
    kept = [c for c in tpm if c.tag in ("alias", "address")]
    for c in list(tpm):
        tpm.remove(c)
    backend = ET.SubElement(tpm, "backend", {"type": "external"})
    ET.SubElement(backend, "source", {"type": "unix", "mode": "connect", "path": bridge_socket})
    tpm.extend(kept)


def _adopt_channel(devices: ET.Element, channel_socket: str, channel_name: str) -> None:
    channel: ET.Element | None = None
    for c in devices.findall("channel"):
        target = c.find("target")
        if (
            target is not None
            and target.get("type") == "virtio"
            and target.get("name") == (channel_name)
        ):
            channel = c
            break
    if channel is None:
        channel = ET.SubElement(devices, "channel")
    kept = [c for c in channel if c.tag in ("alias", "address")]
    for c in list(channel):
        channel.remove(c)
    channel.attrib.clear()
    channel.set("type", "unix")
    ET.SubElement(channel, "source", {"mode": "bind", "path": channel_socket})
    ET.SubElement(channel, "target", {"type": "virtio", "name": channel_name})
    channel.extend(kept)


def _adopt_features(root: ET.Element) -> None:
    features = _child(
        root,
        "features",
        after=("os", "idmap", "bootloader_args", "bootloader", "sysinfo", "blkiotune",
               "memtune", "numatune", "cputune", "iothreadids", "iothreads", "memoryBacking",
               "currentMemory", "memory", "maxMemory"),
    )  # fmt: skip
    acpi = features.find("acpi")
    if acpi is None:
        features.insert(0, ET.Element("acpi"))


def _adopt_metadata(
    root: ET.Element, bridge_socket: str, channel_socket: str, channel_name: str
) -> None:
    metadata = _child(root, "metadata", after=("title", "description", "uuid", "name"))
    tag = f"{{{ADOPTION_NS}}}adopted"
    for old in metadata.findall(tag):
        metadata.remove(old)
    ET.SubElement(
        metadata,
        tag,
        {"version": "1", "bridge": bridge_socket, "channel": channel_socket,
         "channel-name": channel_name},
    )  # fmt: skip


def adopt_domain_xml(
    xml: str,
    *,
    bridge_socket: str,
    channel_socket: str,
    channel_name: str = DEFAULT_CHANNEL_NAME,
) -> str:
    """Rewrite a persistent domain definition for the agent (see the module docstring).

    Args:
        xml: the domain's persistent (inactive) XML.
        bridge_socket: absolute path of the VM's bridge control socket (QEMU connects to it).
        channel_socket: absolute path of the attestation channel's unix socket (QEMU binds it).
        channel_name: the virtio-serial port name the guest agent opens.

    Returns:
        The adopted XML. ``adopt_domain_xml(adopt_domain_xml(x, …), …) == adopt_domain_xml(x, …)``.

    Raises:
        DomainXmlError: malformed XML, or not a ``<domain>``.
        UnadoptableDomain: another hypervisor type, hugepages or file-backed RAM, private NUMA
            memory, memory devices, several TPMs, a TPM model other than tpm-crb/tpm-tis, a
            passthrough or TPM 1.2 backend, or an external backend that is not this VM's bridge.
        ValueError: a socket path that is not absolute or too long for a unix socket; an empty
            channel name.
    """
    root = _parse(xml)
    domain = _name(root)
    _check_path("bridge_socket", bridge_socket)
    _check_path("channel_socket", channel_socket)
    if not channel_name or not re.fullmatch(r"[A-Za-z0-9._-]+", channel_name):
        raise ValueError(f"channel_name must be a port name like org.x.y.0, got {channel_name!r}")
    kind = root.get("type")
    if kind not in _HYPERVISORS:
        raise UnadoptableDomain(
            domain, f"<domain type='{kind}'>: the agent adopts QEMU domains (qemu or kvm) only"
        )
    if root.find("devices") is None:
        ET.SubElement(root, "devices")
    devices = root.find("devices")
    assert devices is not None
    _adopt_memory(domain, root)
    _adopt_tpm(domain, root, devices, bridge_socket)
    _adopt_channel(devices, channel_socket, channel_name)
    _adopt_features(root)
    _adopt_metadata(root, bridge_socket, channel_socket, channel_name)
    return ET.tostring(root, encoding="unicode")


# ---------------------------------------------------------------------------- new domains


def domain_xml_for_image(
    name: str,
    uuid: str,
    *,
    kernel: str,
    initrd: str,
    cmdline: str,
    memory_mib: int,
    bridge_socket: str,
    channel_socket: str,
    console_log: str,
    channel_name: str = DEFAULT_CHANNEL_NAME,
    vcpus: int = 1,
    domain_type: str = "qemu",
    qemu_args: tuple[str, ...] = (),
) -> str:
    """An adopted definition that boots a kernel + initramfs (a ``vm_images/`` image).

    The console is a file serial with ``append='on'`` (libvirt truncates a file serial at every
    QEMU start, a restore included, without it). ``qemu_args`` are passed through
    ``<qemu:commandline>`` (e.g. a user-networking NIC; give it ``addr=0x10``: libvirt's
    virtio-serial controller takes the first free PCI slot, platform-notes §7).

    Raises:
        ValueError: an empty name, a relative path, memory below 16 MiB, vcpus below 1.
        UnadoptableDomain: cannot happen for the XML built here (kept for the signature's sake).
    """
    if not name or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise ValueError(f"domain name must be letters, digits and ._+-, got {name!r}")
    for what, path in (("kernel", kernel), ("initrd", initrd), ("console_log", console_log)):
        if not path.startswith("/"):
            raise ValueError(f"{what} must be an absolute path, got {path!r}")
    if memory_mib < 16:
        raise ValueError(f"memory_mib must be at least 16, got {memory_mib}")
    if vcpus < 1:
        raise ValueError(f"vcpus must be at least 1, got {vcpus}")
    qemu = ""
    if qemu_args:
        args = "".join(f"<qemu:arg value='{_q(a)}'/>" for a in qemu_args)
        qemu = f"<qemu:commandline>{args}</qemu:commandline>"
    base = (
        f"<domain type='{escape(domain_type)}' xmlns:qemu='{QEMU_NS}'>"
        f"<name>{escape(name)}</name><uuid>{escape(uuid)}</uuid>"
        f"<memory unit='MiB'>{int(memory_mib)}</memory><vcpu>{int(vcpus)}</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type>"
        f"<kernel>{escape(kernel)}</kernel><initrd>{escape(initrd)}</initrd>"
        f"<cmdline>{escape(cmdline)}</cmdline></os>"
        "<features><acpi/><apic/></features>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>"
        "<on_crash>destroy</on_crash>"
        "<devices>"
        f"<serial type='file'><source path='{_q(console_log)}' append='on'/>"
        "<target port='0'/></serial>"
        "<memballoon model='none'/>"
        "</devices>"
        f"{qemu}</domain>"
    )
    return adopt_domain_xml(
        base, bridge_socket=bridge_socket, channel_socket=channel_socket, channel_name=channel_name
    )

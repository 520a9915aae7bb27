"""adopt_domain_xml / describe_domain_xml / domain_xml_for_image: pure XML in, XML out."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_agent.lifecycle.domain_xml import (
    ADOPTION_NS,
    DEFAULT_CHANNEL_NAME,
    DomainXmlError,
    UnadoptableDomain,
    adopt_domain_xml,
    describe_domain_xml,
    domain_xml_for_image,
)

BRIDGE = "/var/lib/vtpm-trust/vms/0b3c/bridge.sock"
CHANNEL = "/var/lib/vtpm-trust/vms/0b3c/attest.sock"
UUID = "0b3c5b0e-56d2-4b5e-9d1c-6c2e2b7f9a11"


def domain(devices: str = "", *, head: str = "", kind: str = "qemu") -> str:
    return (
        f"<domain type='{kind}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        f"<name>vm1</name><uuid>{UUID}</uuid><memory unit='KiB'>262144</memory>"
        f"{head}<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
        f"<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}</devices>"
        "<qemu:commandline><qemu:arg value='-netdev'/></qemu:commandline></domain>"
    )


def adopt(xml: str, **kw: str) -> str:
    return adopt_domain_xml(xml, bridge_socket=BRIDGE, channel_socket=CHANNEL, **kw)


def tree(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def test_plain_domain_gets_memfd_external_tpm_channel_acpi_and_metadata() -> None:
    out = tree(adopt(domain()))
    assert out.find("memoryBacking/source").attrib == {"type": "memfd"}
    assert out.find("memoryBacking/access").attrib == {"mode": "shared"}
    tpm = out.find("devices/tpm")
    assert tpm.attrib == {"model": "tpm-crb"}
    assert tpm.find("backend").attrib == {"type": "external"}
    assert tpm.find("backend/source").attrib == {"type": "unix", "mode": "connect", "path": BRIDGE}
    (chan,) = out.findall("devices/channel")
    assert chan.attrib == {"type": "unix"}
    assert chan.find("source").attrib == {"mode": "bind", "path": CHANNEL}
    assert chan.find("target").attrib == {"type": "virtio", "name": DEFAULT_CHANNEL_NAME}
    assert out.find("features/acpi") is not None
    meta = out.find(f"metadata/{{{ADOPTION_NS}}}adopted")
    assert meta is not None and meta.get("bridge") == BRIDGE
    # what we do not touch stays
    assert out.find("devices/emulator").text == "/usr/bin/qemu-system-x86_64"
    assert out.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline") is not None


def test_emulator_tpm_becomes_external_and_keeps_tis_model() -> None:
    xml = domain(
        "<tpm model='tpm-tis'><backend type='emulator' version='2.0'>"
        "<encryption secret='6dd3e4a5-1d76-44ce-961f-f119f5aad935'/>"
        "<active_pcr_banks><sha256/></active_pcr_banks></backend>"
        "<alias name='tpm0'/></tpm>"
    )
    tpm = tree(adopt(xml)).find("devices/tpm")
    assert tpm.get("model") == "tpm-tis"
    assert [c.tag for c in tpm] == ["backend", "alias"]
    assert [c.tag for c in tpm.find("backend")] == ["source"]
    assert describe_domain_xml(xml).tpm_backend == "emulator"


def test_adopting_twice_gives_the_same_xml() -> None:
    xml = domain(
        "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
        "<channel type='pty'><target type='virtio' name='org.vtpm-trust.attest.0'/></channel>",
        head="<memoryBacking><source type='anonymous'/><access mode='private'/>"
        "<locked/></memoryBacking><features><apic/></features>",
    )
    once = adopt(xml)
    assert adopt(once) == once
    out = tree(once)
    assert out.find("memoryBacking/locked") is not None  # other backing options stay
    assert len(out.findall("devices/channel")) == 1
    assert [c.tag for c in out.find("features")] == ["acpi", "apic"]


def test_other_channels_and_a_second_run_with_libvirt_style_formatting() -> None:
    xml = domain(
        "<channel type='unix'><source mode='bind'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    )
    once = adopt(xml)
    names = [c.find("target").get("name") for c in tree(once).findall("devices/channel")]
    assert names == ["org.qemu.guest_agent.0", DEFAULT_CHANNEL_NAME]
    # libvirt re-indents and declares namespaces where it likes: same content after adoption
    pretty = ET.tostring(tree(once), encoding="unicode").replace("><", ">\n  <")
    assert ET.canonicalize(adopt(pretty), strip_text=True) == ET.canonicalize(once, strip_text=True)


def test_describe_reads_the_adoption_back() -> None:
    d = describe_domain_xml(adopt(domain()))
    assert (d.name, d.uuid, d.adopted, d.memfd_shared) == ("vm1", UUID, True, True)
    assert (d.bridge_socket, d.channel_socket, d.external_tpm_path) == (BRIDGE, CHANNEL, BRIDGE)
    plain = describe_domain_xml(domain())
    assert (plain.adopted, plain.tpm_model, plain.memfd_shared) == (False, None, False)


@pytest.mark.parametrize(
    ("xml", "words"),
    [
        (domain(head="<memoryBacking><hugepages/></memoryBacking>"), "hugepages"),
        (domain(head="<memoryBacking><source type='file'/></memoryBacking>"), "type='file'"),
        (domain("<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>"), "1.2"),
        (
            domain("<tpm model='tpm-tis'><backend type='passthrough'/></tpm>"),
            "passthrough",
        ),
        (
            domain(
                "<tpm model='tpm-crb'><backend type='external'>"
                "<source type='unix' mode='connect' path='/run/other.sock'/></backend></tpm>"
            ),
            "/run/other.sock",
        ),
        (domain("<tpm model='tpm-spapr'><backend type='emulator'/></tpm>"), "tpm-spapr"),
        (domain("<tpm model='tpm-crb'/><tpm model='tpm-tis'/>"), "2 <tpm>"),
        (domain(kind="xen"), "type='xen'"),
        (
            domain("<memory model='dimm'><target><size unit='MiB'>128</size></target></memory>"),
            "dimm",
        ),
        (
            domain(
                head="<cpu><numa><cell id='0' cpus='0' memory='262144' "
                "memAccess='private'/></numa></cpu>"
            ),
            "memAccess",
        ),
    ],
)
def test_unadoptable_domains_are_refused_by_name(xml: str, words: str) -> None:
    with pytest.raises(UnadoptableDomain) as exc:
        adopt(xml)
    assert words in str(exc.value)
    assert exc.value.domain == "vm1"
    assert exc.value.id == "lifecycle.domain.unadoptable"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<domain",
        "<domain><name>x</name>",
        "<network><name>x</name></network>",
        "<?xml version='1.0'?><!DOCTYPE d [<!ENTITY a 'b'>]><domain>&a;</domain>",
        "not xml at all",
    ],
)
def test_malformed_xml_is_a_parse_error(text: str) -> None:
    with pytest.raises(DomainXmlError) as exc:
        adopt(text)
    assert exc.value.id == "parse.domain_xml"
    with pytest.raises(DomainXmlError):
        describe_domain_xml(text)


def test_bad_socket_paths_are_caller_errors() -> None:
    with pytest.raises(ValueError, match="absolute"):
        adopt_domain_xml(domain(), bridge_socket="rel.sock", channel_socket=CHANNEL)
    with pytest.raises(ValueError, match="unix socket"):
        adopt_domain_xml(domain(), bridge_socket="/" + "x" * 120, channel_socket=CHANNEL)
    with pytest.raises(ValueError, match="channel_name"):
        adopt(domain(), channel_name="bad name")


def test_domain_xml_for_image_is_adopted_and_escapes_its_inputs() -> None:
    xml = domain_xml_for_image(
        "guest-1",
        UUID,
        kernel="/boot/vmlinuz",
        initrd="/img/initramfs.cpio",
        cmdline="console=ttyS0 vtpm.run='echo <hi> & \"bye\"'",
        memory_mib=256,
        bridge_socket=BRIDGE,
        channel_socket=CHANNEL,
        console_log="/var/log/it's.log",
        qemu_args=("-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22"),
    )
    out = tree(xml)
    assert out.findtext("os/cmdline") == "console=ttyS0 vtpm.run='echo <hi> & \"bye\"'"
    assert out.find("devices/serial/source").attrib == {
        "path": "/var/log/it's.log",
        "append": "on",
    }
    assert adopt(xml) == xml
    assert describe_domain_xml(xml).adopted
    with pytest.raises(ValueError):
        domain_xml_for_image(
            "bad name", UUID, kernel="/k", initrd="/i", cmdline="", memory_mib=256,
            bridge_socket=BRIDGE, channel_socket=CHANNEL, console_log="/c",
        )  # fmt: skip


# ---------------------------------------------------------------------------- properties

_tpm = st.sampled_from(
    [
        "",
        "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>",
        "<tpm model='tpm-tis'><backend type='emulator'/></tpm>",
        "<tpm><backend type='emulator'/></tpm>",
        f"<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' "
        f"path='{BRIDGE}'/></backend></tpm>",
    ]
)
_backing = st.sampled_from(
    [
        "",
        "<memoryBacking/>",
        "<memoryBacking><source type='memfd'/></memoryBacking>",
        "<memoryBacking><access mode='private'/><locked/></memoryBacking>",
        "<memoryBacking><source type='anonymous'/><access mode='shared'/></memoryBacking>",
    ]
)
_features = st.sampled_from(["", "<features/>", "<features><apic/></features>",
                             "<features><acpi/><pae/></features>"])  # fmt: skip
_channels = st.lists(
    st.sampled_from(
        [
            "<channel type='pty'><target type='virtio' name='org.vtpm-trust.attest.0'/></channel>",
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
            "<console type='pty'/>",
            "<serial type='pty'/>",
        ]
    ),
    max_size=3,
    unique=True,
)


@settings(max_examples=150, deadline=None)
@given(tpm=_tpm, backing=_backing, features=_features, channels=_channels)
def test_adoption_is_idempotent_and_complete_over_variations(
    tpm: str, backing: str, features: str, channels: list[str]
) -> None:
    xml = domain(tpm + "".join(channels), head=backing + features)
    once = adopt(xml)
    assert adopt(once) == once
    d = describe_domain_xml(once)
    assert d.adopted and d.memfd_shared and d.tpm_backend == "external"
    assert d.external_tpm_path == BRIDGE
    out = tree(once)
    assert len(out.findall("devices/tpm")) == 1
    assert out.find("features/acpi") is not None
    ours = [
        c
        for c in out.findall("devices/channel")
        if c.find("target") is not None and c.find("target").get("name") == DEFAULT_CHANNEL_NAME
    ]
    assert len(ours) == 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_garbage_raises_only_typed_errors(text: str) -> None:
    with contextlib.suppress(DomainXmlError, UnadoptableDomain):
        adopt(text)

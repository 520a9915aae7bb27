"""Memory roots agree across sources taken from one real QEMU (TCG, no guest OS needed).

QEMU runs its firmware for a moment on 64 MiB of memfd RAM into which deterministic mixed data
(random, zero and nearly-zero pages) was loaded, then is paused; from that one paused state we take
the memfd (``pid:``), a migration stream, an ELF dump, and libvirt save images in every format.
The save images are **hand-made by this test** (92-byte header + XML + the QEMU stream, as
libvirt writes them), not written by libvirt.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from host_agent.cli import main
from host_agent.memory import merkle, saveimage
from host_agent.memory.sources import HashResult, hash_source
from tests.helpers.qmp_min import make_ram_image, qemu_with_ram

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
LOAD_ADDR = 0x100000
IMAGE_SIZE = 8 << 20


@dataclass
class Captured:
    workdir: Path
    image: bytes
    memfd: HashResult
    stream: Path
    elf: Path
    save_images: dict[str, Path]


def _handmade_save_image(stream: bytes, path: Path, fmt: saveimage.SaveFormat) -> Path:
    comp = {
        saveimage.SaveFormat.RAW: lambda b: b,
        saveimage.SaveFormat.GZIP: lambda b: gzip.compress(b, compresslevel=1),
        saveimage.SaveFormat.BZIP2: lambda b: bz2.compress(b, compresslevel=1),
        saveimage.SaveFormat.XZ: lambda b: lzma.compress(b, preset=0),
    }
    if fmt is saveimage.SaveFormat.ZSTD:
        zstandard = pytest.importorskip("zstandard")
        body = zstandard.ZstdCompressor().compress(stream)
    else:
        body = comp[fmt](stream)
    header = saveimage.encode_save_image_header(
        "<domain type='qemu'><name>t</name></domain>", format=fmt, padding=4096
    )
    path.write_bytes(header + body)
    return path


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Captured:
    w = tmp_path_factory.mktemp("memq")
    image = make_ram_image(w / "ram.bin", IMAGE_SIZE)
    with qemu_with_ram(w, w / "ram.bin") as q:
        q.qmp.execute("cont")  # let SeaBIOS shadow its ROMs into RAM (PAM), then pause
        time.sleep(1.5)
        q.qmp.execute("stop")
        memfd = hash_source(f"pid:{q.pid}")
        # The one migration QEMU allows: hash while QEMU saves, the stream going to the file and
        # through our hasher (``memory hash -``) at once.
        piped = w / "piped.json"
        q.qmp.save_stream_command(
            f"cd {REPO} && tee {w}/stream.bin | {sys.executable} -m host_agent.cli memory hash - "
            f"--block pc.ram --json > {piped}.tmp && mv {piped}.tmp {piped}"
        )
        q.qmp.dump_elf(w / "dump.elf")
        deadline = time.monotonic() + 60
        while not piped.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    stream = (w / "stream.bin").read_bytes()
    images = {
        f.name.lower(): _handmade_save_image(stream, w / f"save-{f.name.lower()}.img", f)
        for f in (
            saveimage.SaveFormat.RAW,
            saveimage.SaveFormat.GZIP,
            saveimage.SaveFormat.BZIP2,
            saveimage.SaveFormat.XZ,
            saveimage.SaveFormat.ZSTD,
        )
    }
    return Captured(w, image, memfd, w / "stream.bin", w / "dump.elf", images)


def test_roots_agree_across_memfd_stream_elf_and_save_images(captured: Captured) -> None:
    ram = captured.memfd.leaves
    assert ram.names == ("pc.ram",) and ram.pages == 64 << 8
    want = ram.root()
    stream = hash_source(str(captured.stream))
    assert "pc.ram" in stream.leaves.names and len(stream.leaves.names) > 1
    assert stream.leaves.select(["pc.ram"]).root() == want
    assert stream.tpm_state is None  # no vTPM configured in this QEMU
    assert hash_source(str(captured.elf)).leaves.root() == want
    for name, path in captured.save_images.items():
        got = hash_source(str(path), blocks=["pc.ram"])
        assert got.kind == "save-image", name
        assert got.leaves.root() == want, name
        assert got.leaves == stream.leaves.select(["pc.ram"]), name


def test_hashing_while_qemu_saves_gives_the_same_root(captured: Captured) -> None:
    piped = json.loads((captured.workdir / "piped.json").read_text())
    assert piped["root"] == captured.memfd.leaves.root().hex()
    again = hash_source(str(captured.stream), blocks=["pc.ram"])
    assert again.leaves.root().hex() == piped["root"]


def test_loaded_data_is_what_the_roots_cover(captured: Captured) -> None:
    first = LOAD_ADDR // merkle.PAGE_SIZE
    blk = captured.memfd.leaves.block("pc.ram")
    for i in range(0, IMAGE_SIZE // merkle.PAGE_SIZE, 97):
        page = captured.image[i * merkle.PAGE_SIZE : (i + 1) * merkle.PAGE_SIZE]
        assert blk.leaf(first + i) == merkle.leaf_hash(page)


def test_one_flipped_byte_in_a_save_image_names_exactly_that_page(captured: Captured) -> None:
    data = captured.save_images["raw"].read_bytes()
    base = captured.memfd.leaves
    rng = random.Random(5)
    first = LOAD_ADDR // merkle.PAGE_SIZE
    tried = 0
    for i in rng.sample(range(IMAGE_SIZE // merkle.PAGE_SIZE), 40):
        page = captured.image[i * merkle.PAGE_SIZE : (i + 1) * merkle.PAGE_SIZE]
        at = data.find(page)
        if page.count(0) > 64 or at < 0:
            continue  # only pages sent as PAGE records with unique random content
        bad = bytearray(data)
        bad[at + rng.randrange(merkle.PAGE_SIZE)] ^= 1 << rng.randrange(8)
        path = captured.workdir / "flipped.img"
        path.write_bytes(bad)
        got = hash_source(str(path), blocks=["pc.ram"]).leaves
        assert got.root() != base.root()
        assert merkle.diff(base, got) == [(first + i, first + i)]
        tried += 1
        if tried == 4:
            break
    assert tried == 4


def test_truncated_real_stream_raises_a_typed_error_with_offset(captured: Captured) -> None:
    from evidence.errors import TruncatedError

    data = captured.stream.read_bytes()
    cut = captured.workdir / "cut.bin"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedError) as err:
        hash_source(str(cut))
    assert 0 < err.value.offset <= len(data) // 2


def test_cli_hash_and_diff_json(captured: Captured, capsys: pytest.CaptureFixture[str]) -> None:
    leaves = captured.workdir / "elf.leaves"
    assert main(["memory", "hash", str(captured.elf), "--json", "--leaves", str(leaves)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["root"] == captured.memfd.leaves.root().hex()
    assert out["pages"] == 64 << 8 and out["bytes"] == 64 << 20
    assert 0 < out["zero_pages"] < out["pages"] and out["seconds"] >= 0
    rc = main(["memory", "diff", str(leaves), str(captured.stream), "--block", "pc.ram", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out) == {
        "equal": True,
        "differing_pages": [],
        "blocks": {},
    }
    rc = main(["memory", "diff", str(leaves), str(captured.stream), "--json"])
    assert rc == 2  # different block sets: a typed error, one line on stderr
    assert "memory.layout_mismatch" in capsys.readouterr().err


def test_dirty_tracker_falls_back_to_an_announced_full_hash(tmp_path: Path) -> None:
    """On this machine's kernel soft-dirty is unavailable; the tracker must say so and hash all.

    (Where the kernel has soft-dirty, the fallback is forced through the probe parameter.)
    """
    from host_agent.memory.dirty import SoftDirtyTracker, TrackerSupport, probe_soft_dirty

    support = probe_soft_dirty()
    probe = probe_soft_dirty
    if support.available:

        def probe() -> TrackerSupport:
            return TrackerSupport(False, "forced by the test")

    make_ram_image(tmp_path / "ram.bin", 1 << 20, seed=3)
    said: list[str] = []
    with qemu_with_ram(tmp_path, tmp_path / "ram.bin") as q:
        q.qmp.execute("cont")
        tracker = SoftDirtyTracker.for_qemu(q.pid, probe=probe, announce=said.append)
        first = tracker.start()
        assert first.mode == "full" and "unavailable" in said[0]
        # Write into guest RAM behind the guest's back (through the memfd), then stop.
        with open(f"/proc/{q.pid}/fd/{_memfd_fd(q.pid)}", "r+b") as f:
            f.seek(0x800000 + 5)
            f.write(b"\xff" * 3)
            f.seek(0x900000)
            f.write(b"\x01")
        q.qmp.execute("stop")
        last = tracker.finish()
        full = hash_source(f"pid:{q.pid}").leaves
    assert last.mode == "full" and last.rehashed_pages == last.leaves.pages
    assert any("full hash at the stop" in s for s in said)
    assert last.leaves == full
    changed = merkle.diff(first.leaves, last.leaves)
    assert (0x800, 0x800) in changed and (0x900, 0x900) in changed


def _memfd_fd(pid: int) -> str:
    import os

    for n in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{n}").startswith("/memfd:memory-backend-memfd"):
            return n
    raise AssertionError("no memfd")


def test_vtpm_state_blobs_come_out_of_stream_and_save_image(tmp_path: Path) -> None:
    """With a real swtpm behind QEMU's tpm-emulator, the stream carries its three state blobs."""
    from tests.helpers.qemu import start_swtpm_unix

    swtpm = start_swtpm_unix(tmp_path / "tpm")
    make_ram_image(tmp_path / "ram.bin", 1 << 20, seed=4)
    tpm_args = (
        "-chardev",
        f"socket,id=chrtpm,path={swtpm.ctrl_path}",
        "-tpmdev",
        "emulator,id=tpm0,chardev=chrtpm",
        "-device",
        "tpm-crb,tpmdev=tpm0",
    )
    try:
        with qemu_with_ram(tmp_path, tmp_path / "ram.bin", extra=tpm_args) as q:
            q.qmp.save_stream(tmp_path / "stream.bin")
    finally:
        swtpm.stop()
    got = hash_source(str(tmp_path / "stream.bin"))
    assert got.tpm_state is not None
    st = got.tpm_state
    assert len(st.permanent) > 500 and len(st.volatile) > 500
    image = _handmade_save_image(
        (tmp_path / "stream.bin").read_bytes(), tmp_path / "save.img", saveimage.SaveFormat.XZ
    )
    assert hash_source(str(image)).tpm_state == st.__class__(
        st.permanent,
        st.volatile,
        st.savestate,
        st.permanent_flags,
        st.volatile_flags,
        st.savestate_flags,
        st.offset,
    )

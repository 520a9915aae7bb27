"""Raw-file sources, parallel hashing and the CLI on files written by the test (no QEMU)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from evidence.errors import UnsupportedError
from host_agent.cli import main
from host_agent.errors import MemorySourceError
from host_agent.memory import merkle
from host_agent.memory.hasher import hash_extents
from host_agent.memory.merkle import PAGE_SIZE, ZERO_LEAF, Extent, leaf_hash
from host_agent.memory.sources import (
    detect_kind,
    file_extents,
    hash_source,
    parse_qemu_memory_args,
)

MIB = 1 << 20


def _reference_leaves(data: bytes) -> bytes:
    return b"".join(leaf_hash(data[i : i + PAGE_SIZE]) for i in range(0, len(data), PAGE_SIZE))


def _write_mixed(path: Path, pages: int) -> bytes:
    out = bytearray(pages * PAGE_SIZE)
    for i in range(pages):
        if i % 5 in (1, 2):
            out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = os.urandom(PAGE_SIZE)
        elif i % 5 == 3:
            out[i * PAGE_SIZE + PAGE_SIZE - 1] = 7  # zero but for the last byte
    path.write_bytes(out)
    return bytes(out)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_raw_file_leaves_match_a_page_by_page_reference(tmp_path: Path, workers: int) -> None:
    data = _write_mixed(tmp_path / "ram.raw", 1000)
    seen: list[tuple[int, int]] = []
    res = hash_source(
        str(tmp_path / "ram.raw"), workers=workers, progress=lambda d, t: seen.append((d, t))
    )
    assert res.kind == "raw" and res.leaves.names == ("pc.ram",)
    assert res.leaves.block("pc.ram").leaves == _reference_leaves(data)
    assert res.leaves.zero_pages() == 400
    assert seen[-1] == (1000, 1000)
    assert all(a <= b for (a, _), (b, _) in itertools.pairwise(seen))


def test_sparse_file_holes_are_zero_pages_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.seek(3 * MIB)
        f.write(b"\x01" * PAGE_SIZE)
        f.truncate(8 * MIB)
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = list(file_extents(fd, "pc.ram", 0, 8 * MIB))
    finally:
        os.close(fd)
    data_pages = sum(e.pages for e in extents if e.file_offset is not None)
    assert data_pages < 8 * MIB // PAGE_SIZE  # the filesystem reports holes
    assert sum(e.pages for e in extents) == 8 * MIB // PAGE_SIZE
    leaves = hash_source(str(path)).leaves
    assert leaves.zero_pages() == 8 * MIB // PAGE_SIZE - 1
    assert leaves.block("pc.ram").leaf(3 * MIB // PAGE_SIZE) == leaf_hash(b"\x01" * PAGE_SIZE)


def test_incremental_pass_over_a_base_equals_a_full_pass(tmp_path: Path) -> None:
    path = tmp_path / "ram.raw"
    _write_mixed(path, 600)
    base = hash_source(str(path)).leaves
    fd = os.open(path, os.O_RDWR)
    try:
        for p in (0, 17, 18, 599):
            os.pwrite(fd, b"changed", p * PAGE_SIZE + 9)
        dirty = [Extent("pc.ram", 0, 1, 0), Extent("pc.ram", 17, 2, 17 * PAGE_SIZE)]
        dirty.append(Extent("pc.ram", 599, 1, 599 * PAGE_SIZE))
        inc = hash_extents(fd, base.layout, dirty, base=base)
    finally:
        os.close(fd)
    full = hash_source(str(path)).leaves
    assert inc == full
    assert merkle.diff(base, full) == [(0, 0), (17, 18), (599, 599)]


def test_kind_detection_and_refusals(tmp_path: Path) -> None:
    assert detect_kind(b"LibvirtQemudSave") == "save-image"
    assert detect_kind(b"QEVM\x00\x00\x00\x03") == "stream"
    assert detect_kind(b"\x7fELF\x02") == "elf"
    assert detect_kind(b"\x00" * 16) == "raw"
    for magic in (b"KDUMP   ", b"makedumpfile", b"PAGEDU64"):
        with pytest.raises(UnsupportedError):
            detect_kind(magic + bytes(8))
    (tmp_path / "odd.raw").write_bytes(b"x" * 5000)
    with pytest.raises(UnsupportedError):
        hash_source(str(tmp_path / "odd.raw"))
    with pytest.raises(MemorySourceError):
        hash_source(str(tmp_path / "missing"))
    with pytest.raises(MemorySourceError):
        hash_source("pid:notanumber")


def test_cli_hash_leaves_and_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    data = bytearray(_write_mixed(a, 64))
    data[10 * PAGE_SIZE + 1] ^= 1
    data[11 * PAGE_SIZE + 2] ^= 1
    data[40 * PAGE_SIZE] ^= 1
    b.write_bytes(data)
    leaves = tmp_path / "a.leaves"
    assert main(["memory", "hash", str(a), "--json", "--leaves", str(leaves)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"root", "pages", "zero_pages", "bytes", "seconds"}
    assert (out["pages"], out["bytes"]) == (64, 64 * PAGE_SIZE)
    assert merkle.parse_leaf_file(leaves.read_bytes()).root().hex() == out["root"]
    assert main(["memory", "diff", str(leaves), str(b), "--json"]) == 1
    diff = json.loads(capsys.readouterr().out)
    assert diff["equal"] is False and diff["differing_pages"] == [[10, 11], [40, 40]]
    assert main(["memory", "diff", str(a), str(b)]) == 1
    text = capsys.readouterr().out
    assert "pc.ram: pages 10-11 (offset 0xa000)" in text and "page 40" in text
    assert main(["memory", "hash", str(a)]) == 0
    assert out["root"] in capsys.readouterr().out
    assert main(["memory", "hash", str(a), "--progress", "--json"]) == 0
    assert "hashing: 100.0% (64/64 pages)" in capsys.readouterr().err


def test_zero_leaf_is_used_for_zero_pages_in_every_path(tmp_path: Path) -> None:
    (tmp_path / "z.raw").write_bytes(bytes(3 * PAGE_SIZE))
    assert hash_source(str(tmp_path / "z.raw")).leaves.blocks[0].leaves == ZERO_LEAF * 3


def test_qemu_memory_backend_from_plain_and_libvirt_command_lines() -> None:
    plain = [
        "-machine",
        "pc,accel=tcg,memory-backend=mem",
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
    ]
    assert parse_qemu_memory_args(plain) == ("mem", {"mem": 256 * MIB})
    libvirt = [
        "-machine",
        "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
        "-object",
        '{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,'
        '"x-use-canonical-path-for-ramblock-id":false,"size":1073741824}',
    ]
    assert parse_qemu_memory_args(libvirt) == ("pc.ram", {"pc.ram": 1 << 30})
    assert parse_qemu_memory_args(["-m", "64"]) == (None, {})


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "zstd"])
def test_corrupt_compressed_save_images_raise_parse_errors(tmp_path: Path, fmt: str) -> None:
    import bz2
    import gzip
    import lzma
    import random

    from evidence.errors import ParseError
    from host_agent.memory import saveimage

    stream = b"QEVM\x00\x00\x00\x03" + os.urandom(1 << 16)
    if fmt == "zstd":
        zstandard = pytest.importorskip("zstandard")
        body = zstandard.ZstdCompressor().compress(stream)
    else:
        body = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}[fmt](stream)
    header = saveimage.encode_save_image_header("<d/>", format=saveimage.SaveFormat[fmt.upper()])
    rng = random.Random(fmt)
    for trial in range(12):
        bad = bytearray(body)
        if trial % 3 == 0:
            bad = bad[: rng.randrange(len(bad))]
        else:
            for _ in range(4):
                bad[rng.randrange(len(bad))] ^= 1 + rng.randrange(255)
        path = tmp_path / f"bad{trial}.img"
        path.write_bytes(header + bytes(bad))
        with pytest.raises(ParseError):
            hash_source(str(path))

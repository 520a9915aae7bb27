"""keylime's IMA entry parser (keylime/ima/ast.py, installed from PyPI) as an independent oracle.

keylime parses ASCII lines itself and computes the digest it extends into a PCR bank
(``Entry.pcr_template_hash``, the Linux >= 5.8 rule, 0xFF… for violations) and the template hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from keylime.common import algorithms  # type: ignore[import-untyped]  # pinned in dev: no skip
from keylime.ima import ast  # type: ignore[import-untyped]

from evidence.ima import ImaEntry, encode_ascii, parse_ima_list, replay_ima_pcr10

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "ima"


def _keylime_pcr10(text: bytes, bank: str) -> bytes:
    alg = algorithms.Hash(bank)
    h = getattr(hashlib, bank)
    pcr = bytes(h().digest_size)
    for line in text.decode().splitlines():
        entry = ast.Entry(line, None, ima_hash_alg=algorithms.Hash.SHA1, pcr_hash_alg=alg)
        pcr = h(pcr + entry.pcr_template_hash).digest()
    return pcr


def _lists() -> list[tuple[str, bytes]]:
    from tests.unit.test_ima import ALL, LEGACY, VIOLATION

    out = [(p.stem, p.read_bytes()) for p in sorted(VECTORS.glob("*.ascii"))]
    out.append(("generated-mixed", encode_ascii([*ALL, VIOLATION])))
    out.append(("generated-legacy", encode_ascii([LEGACY, VIOLATION])))
    return out


LISTS = _lists()


@pytest.mark.parametrize(("name", "text"), LISTS, ids=[n for n, _ in LISTS])
@pytest.mark.parametrize("bank", ["sha1", "sha256"])
def test_pcr10_agrees_with_keylime(name: str, text: bytes, bank: str) -> None:
    ours = replay_ima_pcr10(parse_ima_list(text), "5.8", (bank,)).pcr10[bank]
    assert ours == _keylime_pcr10(text, bank)


@pytest.mark.parametrize(("name", "text"), LISTS, ids=[n for n, _ in LISTS])
def test_template_data_bytes_agree_with_keylime(name: str, text: bytes) -> None:
    entries: tuple[ImaEntry, ...] = parse_ima_list(text).entries
    for line, entry in zip(text.decode().splitlines(), entries, strict=True):
        theirs = ast.Entry(line, None)
        assert entry.hash_input == theirs.mode.bytes(), line
        if not entry.is_violation:
            assert entry.template_hash == hashlib.sha1(theirs.mode.bytes()).digest()

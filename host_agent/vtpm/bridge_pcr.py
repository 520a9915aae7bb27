"""TPM2_PCR_Read as the bridge injects it: command bytes, response parsing, all 24 PCRs.

One TPM2_PCR_Read returns at most 8 digests (swtpm/libtpms, ``MAX_PCR_SELECT``-bounded
``TPML_DIGEST``); ``pcrSelectionOut`` says which ones came back, so :func:`read_pcr_bank` asks
again for the rest. If the PCR update counter moves between the commands, the values could mix
two moments, so the read starts over (bounded). Pure: the caller supplies ``transact`` (the
injection).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass

from evidence._reader import Reader
from evidence.errors import ParseError
from evidence.tpm2 import TpmAlgId, TpmlPcrSelection, TpmsPcrSelection

__all__ = [
    "TPM2_CC_PCR_READ",
    "PcrReadResponse",
    "parse_pcr_read_response",
    "pcr_read_command",
    "read_pcr_bank",
    "response_code",
]

TPM2_CC_PCR_READ = 0x0000017E
TPM2_ST_NO_SESSIONS = 0x8001
PCR_COUNT = 24
BANKS = {
    "sha1": TpmAlgId.TPM_ALG_SHA1,
    "sha256": TpmAlgId.TPM_ALG_SHA256,
    "sha384": TpmAlgId.TPM_ALG_SHA384,
}


def pcr_read_command(hash_alg: int, pcrs: Collection[int]) -> bytes:
    """A TPM2_PCR_Read command (no sessions) for ``pcrs`` of bank ``hash_alg``."""
    sel = TpmlPcrSelection((TpmsPcrSelection.from_pcrs(hash_alg, pcrs),)).marshal()
    return struct.pack(">HII", TPM2_ST_NO_SESSIONS, 10 + len(sel), TPM2_CC_PCR_READ) + sel


def response_code(packet: bytes) -> int:
    """The response code of a TPM 2.0 response packet."""
    if len(packet) < 10:
        raise ParseError("TPM response", 0, "a 10-byte header", f"{len(packet)} bytes")
    return int(struct.unpack_from(">I", packet, 6)[0])


@dataclass(frozen=True)
class PcrReadResponse:
    update_counter: int
    selection: TpmlPcrSelection
    digests: tuple[bytes, ...]


def parse_pcr_read_response(packet: bytes) -> PcrReadResponse:
    """Parse a successful TPM2_PCR_Read response (Part 3 §22.4).

    Raises:
        ParseError: not a success response, or malformed.
    """
    r = Reader(packet)
    tag = r.u16be("TPM2_PCR_Read response.tag")
    size = r.u32be("TPM2_PCR_Read response.size")
    rc = r.u32be("TPM2_PCR_Read response.responseCode")
    if tag != TPM2_ST_NO_SESSIONS or size != len(packet) or rc != 0:
        raise ParseError(
            "TPM2_PCR_Read response",
            0,
            "tag 0x8001, matching size, rc 0",
            f"tag 0x{tag:04x} size {size}/{len(packet)} rc 0x{rc:x}",
        )
    counter = r.u32be("TPM2_PCR_Read response.pcrUpdateCounter")
    start = r.pos
    count = struct.unpack_from(">I", packet, start)[0] if r.remaining >= 4 else 0
    # TpmlPcrSelection.unmarshal wants the exact bytes: find its end by reading it.
    sel_reader = Reader(packet, start)
    sel_reader.u32be("TPML_PCR_SELECTION.count")
    for _ in range(min(count, 16)):
        sel_reader.u16be("TPMS_PCR_SELECTION.hash")
        sel_reader.take(sel_reader.u8("TPMS_PCR_SELECTION.sizeofSelect"), "pcrSelect")
    selection = TpmlPcrSelection.unmarshal(packet[start : sel_reader.pos])
    r = Reader(packet, sel_reader.pos)
    n = r.u32be("TPML_DIGEST.count")
    if n > 8:
        raise ParseError("TPML_DIGEST.count", r.offset - 4, "at most 8", str(n))
    digests = tuple(r.take(r.u16be("TPM2B_DIGEST.size"), "TPM2B_DIGEST.buffer") for _ in range(n))
    r.expect_end("TPM2_PCR_Read response")
    if len(selection.pcrs) != n:
        raise ParseError(
            "TPM2_PCR_Read response", 0, f"{len(selection.pcrs)} digests", f"{n} digests"
        )
    return PcrReadResponse(counter, selection, digests)


def read_pcr_bank(
    transact: Callable[[bytes], bytes],
    bank: str = "sha256",
    pcrs: Collection[int] = range(PCR_COUNT),
    *,
    attempts: int = 5,
) -> dict[int, bytes]:
    """Read ``pcrs`` of ``bank`` with as many TPM2_PCR_Read commands as it takes.

    Args:
        transact: sends one command packet, returns the response packet.
        bank: ``sha1``, ``sha256`` or ``sha384``.
        pcrs: which PCRs.
        attempts: how often to start over when the update counter moves mid-read.

    Returns:
        PCR index → digest, every requested index present.

    Raises:
        ValueError: an unknown bank or PCR index.
        ParseError: a malformed response; the TPM returned a PCR we did not ask for or none.
    """
    if bank not in BANKS:
        raise ValueError(f"unknown PCR bank {bank!r}; known: {sorted(BANKS)}")
    alg = int(BANKS[bank])
    wanted = sorted(set(pcrs))
    if any(not 0 <= p < PCR_COUNT for p in wanted):
        raise ValueError(f"PCR indices must be 0..{PCR_COUNT - 1}")
    for _ in range(attempts):
        values: dict[int, bytes] = {}
        counter: int | None = None
        moved = False
        while len(values) < len(wanted):
            todo = [p for p in wanted if p not in values]
            resp = parse_pcr_read_response(transact(pcr_read_command(alg, todo)))
            if counter is None:
                counter = resp.update_counter
            elif counter != resp.update_counter:
                moved = True
                break
            got = [p for a, p in resp.selection.pcrs if a == alg]
            if not got or any(p not in todo for p in got):
                raise ParseError(
                    "TPM2_PCR_Read pcrSelectionOut", 0, f"a subset of {todo}", str(got)
                )
            values.update(zip(got, resp.digests, strict=True))
        if not moved:
            return values
    raise ParseError(
        "TPM2_PCR_Read", 0, "a stable pcrUpdateCounter", f"it moved in {attempts} attempts"
    )

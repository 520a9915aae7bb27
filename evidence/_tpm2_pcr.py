"""TPML_PCR_SELECTION and TPMS_PCR_SELECTION (Part 2 §10.6, §10.9.7): which banks and PCRs.

Part of :mod:`evidence.tpm2`; import from there. A selection names the PCRs a PCR read returns
and a quote digests, in the order it digests them; TPMS_QUOTE_INFO (:mod:`evidence._tpm2_attest`)
carries one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from evidence._reader import Reader
from evidence._tpm2_constants import _HASH_ALGS, _HASH_COUNT_MAX, _PCR_SELECT_MAX
from evidence._tpm2_marshal import _check_uint, _exact, _read_alg, _u8, _u16, _u32
from evidence.errors import ParseError

__all__ = ["TpmlPcrSelection", "TpmsPcrSelection"]


# --------------------------------------------------------------------------------------------
# TPML_PCR_SELECTION (Part 2 §10.6, §10.9.7)


@dataclass(frozen=True)
class TpmsPcrSelection:
    """TPMS_PCR_SELECTION: a bank (``hash_alg``) and a bitmap, bit n of byte n//8 = PCR n."""

    hash_alg: int
    pcr_select: bytes

    def __post_init__(self) -> None:
        _check_uint("TPMS_PCR_SELECTION", "hash", self.hash_alg, 16)
        if not isinstance(self.pcr_select, bytes) or len(self.pcr_select) > _PCR_SELECT_MAX:
            raise ValueError(f"TPMS_PCR_SELECTION.pcrSelect must be ≤ {_PCR_SELECT_MAX} bytes")

    @classmethod
    def from_pcrs(cls, hash_alg: int, pcrs: Collection[int], size: int = 3) -> TpmsPcrSelection:
        """Build a selection of ``pcrs`` in a bitmap of ``size`` bytes (3 covers PCR 0-23)."""
        bitmap = bytearray(size)
        for pcr in pcrs:
            if not 0 <= pcr < 8 * size:
                raise ValueError(f"PCR {pcr} does not fit a {size}-byte pcrSelect")
            bitmap[pcr // 8] |= 1 << (pcr % 8)
        return cls(hash_alg, bytes(bitmap))

    @property
    def pcrs(self) -> tuple[int, ...]:
        """Selected PCR indices, ascending (the order a quote digests them in)."""
        return tuple(
            8 * i + bit
            for i, byte in enumerate(self.pcr_select)
            for bit in range(8)
            if byte >> bit & 1
        )

    @classmethod
    def _read(cls, r: Reader) -> TpmsPcrSelection:
        hash_alg = _read_alg(r, "TPMS_PCR_SELECTION.hash", _HASH_ALGS)
        offset = r.offset
        size = r.u8("TPMS_PCR_SELECTION.sizeofSelect")
        if size > _PCR_SELECT_MAX:
            raise ParseError(
                "TPMS_PCR_SELECTION.sizeofSelect", offset, f"at most {_PCR_SELECT_MAX}", str(size)
            )
        return cls(hash_alg, r.take(size, "TPMS_PCR_SELECTION.pcrSelect"))

    def marshal(self) -> bytes:
        """Marshal as TPMS_PCR_SELECTION."""
        return _u16(self.hash_alg) + _u8(len(self.pcr_select)) + self.pcr_select


@dataclass(frozen=True)
class TpmlPcrSelection:
    """TPML_PCR_SELECTION: the banks and PCRs a quote covers, in digest order."""

    selections: tuple[TpmsPcrSelection, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.selections, tuple) or len(self.selections) > _HASH_COUNT_MAX:
            raise ValueError(f"TPML_PCR_SELECTION holds a tuple of ≤ {_HASH_COUNT_MAX} selections")

    @property
    def pcrs(self) -> tuple[tuple[int, int], ...]:
        """``(hash_alg, pcr)`` pairs in the order TPM2_Quote concatenates the PCR values."""
        return tuple((sel.hash_alg, pcr) for sel in self.selections for pcr in sel.pcrs)

    @classmethod
    def _read(cls, r: Reader) -> TpmlPcrSelection:
        offset = r.offset
        count = r.u32be("TPML_PCR_SELECTION.count")
        if count > _HASH_COUNT_MAX:
            raise ParseError(
                "TPML_PCR_SELECTION.count", offset, f"at most {_HASH_COUNT_MAX}", str(count)
            )
        return cls(tuple(TpmsPcrSelection._read(r) for _ in range(count)))

    @classmethod
    def unmarshal(cls, data: bytes) -> TpmlPcrSelection:
        """Parse a TPML_PCR_SELECTION that fills ``data`` exactly.

        Raises:
            UnsupportedError: a bank whose hash we do not know.
            TruncatedError: ``data`` ends inside the list.
            ParseError: count above 16, sizeofSelect above 32, or trailing bytes.
        """
        return _exact(data, "TPML_PCR_SELECTION", cls._read)

    def marshal(self) -> bytes:
        """Marshal as TPML_PCR_SELECTION."""
        return _u32(len(self.selections)) + b"".join(s.marshal() for s in self.selections)

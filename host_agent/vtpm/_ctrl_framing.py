"""TPM 2.0 packet framing of the data channel (the socket swtpm gets with CMD_SET_DATAFD).

Part of :mod:`host_agent.vtpm.ctrl_codec`, whose docstring has the theory of operation; import
from there. The data channel carries whole TPM command and response packets, each sized by its
own header; :class:`TpmPacketFramer` cuts one direction of it into packets and shares nothing
with the control-channel messages but the big-endian u32.
"""

from __future__ import annotations

from evidence.errors import ParseError
from host_agent.vtpm._ctrl_proto import _U32

__all__ = ["MAX_TPM_PACKET", "TPM_HEADER_SIZE", "TpmPacketFramer"]

#: Largest TPM 2.0 packet on the data channel (swtpm's maximum buffer size, SET_BUFFERSIZE max).
MAX_TPM_PACKET = 4096
#: TPM 2.0 response/command header: ``u16 tag, u32 size, u32 code`` (Part 1 §18).
TPM_HEADER_SIZE = 10


class TpmPacketFramer:
    """Splits one direction of the data channel into whole TPM packets by their size field.

    The bytes of every packet are returned unchanged. A size below the 10-byte header or above
    ``max_size`` cannot be framed and raises ParseError (the stream is then unusable).
    """

    def __init__(self, max_size: int = MAX_TPM_PACKET, what: str = "TPM packet") -> None:
        self._buf = bytearray()
        self._max = max_size
        self._what = what
        self._offset = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_packet(self) -> bytes | None:
        if len(self._buf) < 6:
            return None
        size = _U32.unpack_from(self._buf, 2)[0]
        if not TPM_HEADER_SIZE <= size <= self._max:
            raise ParseError(
                f"{self._what}.size", self._offset + 2, f"{TPM_HEADER_SIZE}..{self._max}", str(size)
            )
        if len(self._buf) < size:
            return None
        packet = bytes(self._buf[:size])
        del self._buf[:size]
        self._offset += size
        return packet

"""Pure codec of swtpm's control channel (``--ctrl type=unixio``) and of the TPM data channel.

Theory of operation
-------------------
The control channel is a byte stream with no framing of its own (swtpm
``include/swtpm/tpm_ioctl.h``, ``src/swtpm/ctrlchannel.c``): a request is a 4-byte big-endian
command code followed by that command's ``req`` struct; a reply is the ``resp`` part of the union,
starting with a big-endian ``u32 tpm_result``. Every integer is big-endian. A client never
pipelines: it writes one request and reads its reply before the next one.

So a request's length follows from its code (and, for HASH_DATA / SET_STATEBLOB, from a length in
its header), while a reply's length follows from the request it answers, from its own result
field, and from whether the TPM is running: swtpm answers most errors with a bare 4-byte result,
but GET_STATEBLOB and GET_TPMESTABLISHED keep their full shape while the TPM is running. That is
why reply decoding takes the request and the run state (:class:`TpmRunState` tracks it from the
traffic itself).

The quirks of the two real producers are data, in :data:`QUIRKS`, each citing its source.

Layers, one per name:

- request dataclasses (:class:`Init`, :class:`GetStateBlob` …) with ``encode()``;
  :func:`decode_request` (one whole message) and :class:`RequestDecoder` (incremental);
- reply dataclasses with ``encode()``; :func:`decode_reply` and :class:`ReplyDecoder`;
  :func:`fault_reply` builds an error reply in the shape the client will read;
- :class:`TpmRunState`: running / stopped / terminated, locality, from requests and replies;
- :class:`TpmPacketFramer`: splits the data channel into TPM 2.0 command/response packets.

Nothing here does I/O: callers own the sockets and the file descriptors passed with
CMD_SET_DATAFD (which travel out of band, never in these bytes).

Layout: this module is the public face and holds no code; import from it. The parts, each of
which imports only the ones above it (never this module):

- :mod:`host_agent.vtpm._ctrl_proto`: bounds, command and result codes, flags, :data:`QUIRKS`
  and the field checks the messages share;
- :mod:`host_agent.vtpm._ctrl_requests`: the requests, :func:`decode_request`,
  :class:`RequestDecoder`;
- :mod:`host_agent.vtpm._ctrl_replies`: the replies, :func:`reply_kind`, :func:`decode_reply`,
  :class:`ReplyDecoder`, :func:`fault_reply`;
- :mod:`host_agent.vtpm._ctrl_runstate`: :class:`RunState` and :class:`TpmRunState`;
- :mod:`host_agent.vtpm._ctrl_framing`: :class:`TpmPacketFramer` (needs only ``_ctrl_proto``).
"""

from __future__ import annotations

# The "name as name" imports re-export names callers use that are not in __all__.
from host_agent.vtpm._ctrl_framing import MAX_TPM_PACKET, TpmPacketFramer
from host_agent.vtpm._ctrl_framing import TPM_HEADER_SIZE as TPM_HEADER_SIZE
from host_agent.vtpm._ctrl_proto import INIT_FLAG_DELETE_VOLATILE as INIT_FLAG_DELETE_VOLATILE
from host_agent.vtpm._ctrl_proto import (
    MAX_HASH_DATA,
    MAX_STATE_BLOB,
    QUIRKS,
    BlobType,
    CtrlCmd,
    PtmCap,
    PtmResult,
    Quirk,
)
from host_agent.vtpm._ctrl_proto import MAX_INFO_DATA as MAX_INFO_DATA
from host_agent.vtpm._ctrl_proto import STATE_FLAG_DECRYPTED as STATE_FLAG_DECRYPTED
from host_agent.vtpm._ctrl_proto import STATE_FLAG_ENCRYPTED as STATE_FLAG_ENCRYPTED
from host_agent.vtpm._ctrl_replies import (
    BufferSizeReply,
    CapabilityReply,
    ConfigReply,
    EstablishedReply,
    InfoReply,
    Reply,
    ReplyDecoder,
    ReplyKind,
    ResultReply,
    StateBlobReply,
    decode_reply,
    fault_reply,
    reply_kind,
)
from host_agent.vtpm._ctrl_requests import (
    CancelTpmCmd,
    GetCapability,
    GetConfig,
    GetInfo,
    GetStateBlob,
    GetTpmEstablished,
    HashData,
    HashEnd,
    HashStart,
    Init,
    LockStorage,
    Request,
    RequestDecoder,
    ResetTpmEstablished,
    SetBufferSize,
    SetDataFd,
    SetLocality,
    SetStateBlob,
    Shutdown,
    Stop,
    StoreVolatile,
    decode_request,
)
from host_agent.vtpm._ctrl_runstate import RunState, TpmRunState

__all__ = [
    "MAX_HASH_DATA",
    "MAX_STATE_BLOB",
    "MAX_TPM_PACKET",
    "QUIRKS",
    "BlobType",
    "BufferSizeReply",
    "CancelTpmCmd",
    "CapabilityReply",
    "ConfigReply",
    "CtrlCmd",
    "EstablishedReply",
    "GetCapability",
    "GetConfig",
    "GetInfo",
    "GetStateBlob",
    "GetTpmEstablished",
    "HashData",
    "HashEnd",
    "HashStart",
    "InfoReply",
    "Init",
    "LockStorage",
    "PtmCap",
    "PtmResult",
    "Quirk",
    "Reply",
    "ReplyDecoder",
    "ReplyKind",
    "Request",
    "RequestDecoder",
    "ResetTpmEstablished",
    "ResultReply",
    "RunState",
    "SetBufferSize",
    "SetDataFd",
    "SetLocality",
    "SetStateBlob",
    "Shutdown",
    "StateBlobReply",
    "Stop",
    "StoreVolatile",
    "TpmPacketFramer",
    "TpmRunState",
    "decode_reply",
    "decode_request",
    "fault_reply",
    "reply_kind",
]

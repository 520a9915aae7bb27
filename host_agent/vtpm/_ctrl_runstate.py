"""The emulated TPM's run state, followed from the control traffic itself.

Part of :mod:`host_agent.vtpm.ctrl_codec`, whose docstring has the theory of operation; import
from there. :class:`TpmRunState` is the codec's only state: it watches INIT / STOP / SHUTDOWN /
SET_LOCALITY (and a few others) with their replies, and its ``running`` flag is what reply
decoding needs to know the shape of the next reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from host_agent.vtpm._ctrl_replies import BufferSizeReply, Reply
from host_agent.vtpm._ctrl_requests import (
    GetStateBlob,
    Init,
    Request,
    SetBufferSize,
    SetLocality,
    Shutdown,
    Stop,
)

__all__ = ["RunState", "TpmRunState"]


class RunState(Enum):
    """The emulated TPM's state as the control traffic shows it."""

    STOPPED = "stopped"  # fresh swtpm without not-need-init, after STOP or a failed INIT
    RUNNING = "running"  # after a successful INIT
    TERMINATED = "terminated"  # after SHUTDOWN: the swtpm process exits


@dataclass
class TpmRunState:
    """Follows INIT/STOP/SHUTDOWN/SET_LOCALITY and their replies (the codec's only state).

    Attributes:
        state: running, stopped or terminated.
        locality: the last locality swtpm accepted (None before any SET_LOCALITY).
        saw_get_stateblob: a GET_STATEBLOB was answered since the last INIT.
    """

    state: RunState = RunState.STOPPED
    locality: int | None = None
    saw_get_stateblob: bool = False
    buffersize: int | None = None

    @property
    def running(self) -> bool:
        return self.state is RunState.RUNNING

    def apply(self, request: Request, reply: Reply) -> None:
        """Update from one request and swtpm's reply to it."""
        result = reply.result
        if isinstance(request, Init):
            self.state = RunState.RUNNING if result == 0 else RunState.STOPPED
            self.saw_get_stateblob = False
        elif isinstance(request, Stop):
            if result == 0:
                self.state = RunState.STOPPED
        elif isinstance(request, Shutdown):
            self.state = RunState.TERMINATED
        elif isinstance(request, SetLocality):
            if result == 0:
                self.locality = request.locality
        elif isinstance(request, GetStateBlob):
            self.saw_get_stateblob = True
        elif isinstance(request, SetBufferSize) and isinstance(reply, BufferSizeReply):
            self.buffersize = reply.buffersize

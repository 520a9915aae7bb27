"""The bridge's state-blob hooks: the daemon's say over CMD_GET_STATEBLOB and CMD_SET_STATEBLOB.

The bridge calls the daemon on CMD_GET_STATEBLOB (after swtpm answered, before QEMU gets the
blob) and on CMD_SET_STATEBLOB (before the blob reaches swtpm). The daemon answers allow,
veto(reason) or replace(blob); a veto answers QEMU with TPM_FAIL in the reply shape QEMU reads,
so QEMU aborts the save or the restore. With the daemon gone, a hook waits for it up to
``hook_timeout`` and then vetoes with reason "daemon unavailable"; with no daemon configured,
a state transfer passes only under ``allow_unhooked_state_transfer``.

:class:`StateBlobHooks` keeps the hooks waiting for a verdict and turns verdicts into control
replies. It is a helper of :class:`~host_agent.vtpm.bridge.Bridge` with explicit collaborators
(the QEMU session, the control channel's ``answer``/``forward`` and the daemon peer) and runs on
the bridge's loop thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from host_agent.vtpm import ctrl_codec as cc
from host_agent.vtpm.bridge_link import LinkPeer
from host_agent.vtpm.bridge_state import BridgeConfig, BridgeStats, PendingHook, Session
from host_agent.vtpm.daemon_link import HookCall, HookEvent, HookReply, Verdict

__all__ = ["DAEMON_UNAVAILABLE", "ReplyHandler", "StateBlobHooks"]

log = logging.getLogger("host_agent.vtpm.bridge")

#: Reason given when a hook's bound passes with no daemon connected (the issue's wording).
DAEMON_UNAVAILABLE = "daemon unavailable"

#: What the control channel calls with swtpm's reply to a forwarded request.
ReplyHandler = Callable[[cc.Request, cc.Reply], None]


class StateBlobHooks:
    """The pending state-blob hooks of one bridge and what their verdicts do.

    Args:
        config, stats, clock: the bridge's (``clock`` sets the hooks' deadlines).
        session: the current QEMU session, or None.
        answer: send a control reply to QEMU (and take QEMU's next request).
        forward: send a control request to swtpm; its reply goes to the handler.
        daemon: the connected daemon peer, or None.
    """

    def __init__(
        self,
        config: BridgeConfig,
        stats: BridgeStats,
        clock: Callable[[], float],
        *,
        session: Callable[[], Session | None],
        answer: Callable[[cc.Reply], None],
        forward: Callable[[cc.Request, ReplyHandler], None],
        daemon: Callable[[], LinkPeer | None],
    ) -> None:
        self.config = config
        self.stats = stats
        self.clock = clock
        self._session = session
        self._answer = answer
        self._forward = forward
        self._daemon = daemon
        #: Hooks waiting for a verdict, by call id. Never replaced, only emptied: the bridge's
        #: loop and data relay read this same dict without a call.
        self.pending: dict[int, PendingHook] = {}
        self._next_hook = 0

    def call(
        self,
        event: str,
        blob_type: int,
        blob: bytes,
        state_flags: int,
        result: int,
        done: Callable[[HookReply], None],
    ) -> None:
        self._next_hook += 1
        call = HookCall.for_blob(
            self._next_hook,
            self.config.vm_uuid,
            event,
            blob_type,
            blob,
            state_flags=state_flags,
            result=result,
            include_blob=True,  # the daemon seals GET blobs and checks SET blobs
        )
        self.stats.hooks += 1
        if self.config.daemon_socket is None:
            if self.config.allow_unhooked_state_transfer:
                done(HookReply(call.id, Verdict.ALLOW))
            else:
                done(HookReply(call.id, Verdict.VETO, "no daemon configured for this bridge"))
            return
        hook = PendingHook(call, self.clock() + self.config.hook_timeout, done)
        self.pending[call.id] = hook
        daemon = self._daemon()
        if daemon is not None:
            hook.sent = daemon.send(call)

    def verdict(self, reply: HookReply) -> None:
        hook = self.pending.pop(reply.id, None)
        if hook is None:
            log.warning("bridge %s: verdict for unknown hook %d", self.config.vm_uuid, reply.id)
            return
        hook.done(reply)

    def expire(self, now: float) -> None:
        """Veto the hooks whose deadline passed."""
        for hook in [h for h in self.pending.values() if h.deadline <= now]:
            connected = self._daemon() is not None
            reason = (
                f"daemon did not answer within {self.config.hook_timeout:g} s"
                if connected and hook.sent
                else DAEMON_UNAVAILABLE
            )
            del self.pending[hook.call.id]
            hook.done(HookReply(hook.call.id, Verdict.VETO, reason))

    def send_all(self, daemon: LinkPeer) -> None:
        """Send every pending hook to a daemon that just connected."""
        for hook in self.pending.values():
            hook.sent = daemon.send(hook.call)

    def mark_unsent(self) -> None:
        """The daemon link was lost: no pending hook is with a daemon any more."""
        for hook in self.pending.values():
            hook.sent = False

    def abandon(self) -> None:
        """The QEMU session ended: verdicts still to come have nobody to answer."""
        for hook in self.pending.values():
            hook.done = lambda _r: None
        self.pending.clear()

    def _log_veto(self, event: str, blob_type: int, reason: str) -> None:
        text = f"{event} {_blob_name(blob_type)} vetoed: {reason}"
        self.stats.vetoes.append(text)
        log.warning("bridge %s: %s", self.config.vm_uuid, text)

    def after_get_stateblob(self, req: cc.Request, reply: cc.Reply) -> None:
        """swtpm answered CMD_GET_STATEBLOB: ask the daemon before QEMU gets the blob."""
        assert isinstance(req, cc.GetStateBlob)
        if not isinstance(reply, cc.StateBlobReply):
            self._answer(reply)  # a bare error: nothing was handed out
            return

        def done(verdict: HookReply) -> None:
            if self._session() is None:
                return
            if verdict.verdict == Verdict.ALLOW:
                self._answer(reply)
            elif verdict.verdict == Verdict.REPLACE:
                flags = reply.state_flags if verdict.state_flags is None else verdict.state_flags
                self._answer(cc.StateBlobReply.of(verdict.blob, flags))
            else:
                self._log_veto(HookEvent.GET_STATEBLOB, req.blob_type, verdict.reason)
                self._answer(cc.fault_reply(req, True, cc.PtmResult.TPM_FAIL))

        self.call(
            HookEvent.GET_STATEBLOB,
            req.blob_type,
            reply.data,
            reply.state_flags,
            reply.result,
            done,
        )

    def set_stateblob(self, req: cc.SetStateBlob) -> None:
        """QEMU sent CMD_SET_STATEBLOB: ask the daemon before the blob reaches swtpm."""
        self.call(
            HookEvent.SET_STATEBLOB,
            req.blob_type,
            req.data,
            req.state_flags,
            0,
            lambda verdict: self._after_set_hook(req, verdict),
        )

    def _after_set_hook(self, req: cc.SetStateBlob, verdict: HookReply) -> None:
        s = self._session()
        if s is None:
            return
        if verdict.verdict == Verdict.VETO:
            self._log_veto(HookEvent.SET_STATEBLOB, req.blob_type, verdict.reason)
            self._answer(cc.fault_reply(req, s.state.running, cc.PtmResult.TPM_FAIL))
            return
        if verdict.verdict == Verdict.REPLACE:
            flags = req.state_flags if verdict.state_flags is None else verdict.state_flags
            req = cc.SetStateBlob(req.blob_type, verdict.blob, flags)
        self._forward(req, lambda _req, reply: self._answer(reply))


def _blob_name(blob_type: int) -> str:
    try:
        return cc.BlobType(blob_type).name
    except ValueError:
        return f"type {blob_type}"

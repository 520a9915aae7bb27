"""The attestation hot path of the host TPM adapter: keys kept loaded, raw TPM commands.

:class:`HotPath` holds what ``attest``, ``certify`` and ``sign`` run: the keys kept loaded
between calls (least recently used flushed first) and their saved contexts, the kept policy
sessions, the cache of fleet-approval tickets, and the TPM2_Certify / TPM2_Sign sequences sent
as raw commands (:mod:`._raw`) rather than through ESAPI. It is a base class of the adapter
(above :class:`~host_agent.tpm._objects.TpmObjects`), not an object of its own:
``PytssHostTpm.__init__`` sets its state, and the few ESAPI operations it needs (SRK, loading a
PCR-bound parent, reading PCRs, hashing a long message) come from its base. Kept apart because
it is the one part built for speed, with caches whose lifetime ``_quiesce`` and the lease
decide; the adapter module docstring tells why.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import lru_cache
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.types import TPMT_SIGNATURE, TPMT_TK_VERIFIED

from evidence import tpm2_policy as pure
from evidence.tpm2_policy import PolicyApproval

from . import _raw as raw
from . import keys, policies
from ._connection import _RC_OBJECT_MEMORY, _is_link_error
from ._objects import _KEY_LABEL, _MAX_HASH_BUFFER, TpmObjects
from ._raw import RawTpm, RawTpmError, RawTpmRc
from ._wire import private_from_bytes, public_from_bytes
from .errors import (
    PlatformStateNotApproved,
    PolicyNotApproved,
    TpmCommandError,
    TpmError,
    TpmObjectMemoryFull,
)
from .port import AUTHKEY_PCRS, Certification, KeyPolicy, WrappedKey

__all__ = ["HotPath"]

T = TypeVar("T")

_RC_TCTI_IO_ERROR = 0x000A000A
_MAX_SAVED_CONTEXTS = 1024
_MAX_TICKETS = 64


def _key_identity(key: WrappedKey) -> bytes:
    """SHA-256 over a wrapped key's public and private parts and its parents' (memoised: the
    hot path asks ~14 times per attestation; equal keys have equal identities)."""
    try:
        return _key_identity_cached(key)
    except TypeError:  # a field that is not hashable (a list of PCRs): not memoised
        return _key_identity_of(key)


def _key_identity_of(key: WrappedKey) -> bytes:
    h = hashlib.sha256()
    k: WrappedKey | None = key
    while k is not None:
        for part in (k.public, k.private):
            h.update(len(part).to_bytes(4, "big") + part)
        k = k.parent
    return h.digest()


_key_identity_cached = lru_cache(maxsize=1024)(_key_identity_of)


class HotPath(TpmObjects):
    """The attestation hot path of :class:`~host_agent.tpm.adapter.PytssHostTpm` (module
    docstring)."""

    # set by PytssHostTpm.__init__
    _saved: OrderedDict[bytes, bytes]
    _tickets: OrderedDict[tuple[bytes, ...], bytes]
    _branch_cache: dict[tuple[bytes, bytes], tuple[bytes, bytes]]

    @staticmethod
    def _cache_key(key: WrappedKey) -> bytes:
        """Identity of a wrapped key with its parent chain (what is loaded is exactly this)."""
        return _key_identity(key)

    @property
    def _rt(self) -> RawTpm:
        assert self._raw is not None
        return self._raw

    def _r(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one raw command (:mod:`._raw`); errors become this port's errors."""
        try:
            return fn(*args)
        except RawTpmRc as err:
            cls = TpmObjectMemoryFull if (err.rc & 0xFFF) == _RC_OBJECT_MEMORY else TpmCommandError
            raise cls(err.rc, err.command) from err
        except RawTpmError as err:
            if err.link:
                raise TpmCommandError(_RC_TCTI_IO_ERROR, err.command, str(err)) from err
            raise TpmError(f"the TPM's answer to {err.command} is malformed: {err}") from err

    def _make_room(self, slots: int, pinned: Sequence[bytes]) -> None:
        """Flush least recently used keys (never ``pinned`` ones) until ``slots`` are free."""
        while len(self._resident) + slots > self._capacity:
            victim = next((k for k in self._resident if k not in pinned), None)
            if victim is None:
                return  # the TPM will say whether it fits
            h = self._resident.pop(victim)
            with suppress(TpmError):
                self._r(self._rt.flush, h)

    def _use(self, key: WrappedKey, pinned: Sequence[bytes] = ()) -> int:
        """``key`` loaded (its TPM handle), and kept loaded for later calls (until evicted or
        quiesced).

        A key loaded once is context-saved: later it comes back with TPM2_ContextLoad (no
        parent, no unwrapping), which needs one object slot where TPM2_Load under the SRK needs
        two. A saved context that no longer loads (the TPM restarted) is loaded again.
        """
        ck = self._cache_key(key)
        h = self._resident.get(ck)
        if h is not None:
            self._resident.move_to_end(ck)
            return h
        ctx = self._saved.get(ck)
        if ctx is not None:
            self._make_room(1, pinned)
            try:
                h = self._r(self._rt.context_load, ctx)
                self._stats["context_loads"] += 1
                self._saved.move_to_end(ck)
            except TpmObjectMemoryFull:
                raise
            except TpmCommandError as err:
                if _is_link_error(err.rc):
                    raise
                self._saved.pop(ck, None)
        if h is None:
            h = self._load_and_save(key, ck, pinned)
        self._resident[ck] = h
        return h

    def _load_and_save(self, key: WrappedKey, ck: bytes, pinned: Sequence[bytes]) -> int:
        """First use of a key: TPM2_Load (under the SRK raw; under a PCR-bound parent through
        ESAPI and its policy), then TPM2_ContextSave for the later uses."""
        if key.parent is None:
            self._make_room(2, pinned)  # the SRK takes a slot while TPM2_Load runs
            self._srk()  # exists (created if missing)
            private = private_from_bytes(key.private).marshal()
            h = self._r(self._rt.load, keys.SRK_HANDLE, private, key.public)
        else:
            self._make_room(self._capacity, pinned)  # parent, its parent, the key
            tr = self._load(key)
            try:
                h = int(self._x("ESYS_TR_GetTpmHandle", self._e.tr_get_tpm_handle, tr))
                ctx = self._r(self._rt.context_save, h)
            finally:
                with suppress(TSS2_Exception):
                    self._e.flush_context(tr)
            h = self._r(self._rt.context_load, ctx)
        self._stats["loads"] += 1
        try:
            self._saved[ck] = self._r(self._rt.context_save, h)
        except TpmError:
            with suppress(TpmError):
                self._r(self._rt.flush, h)
            raise
        if len(self._saved) > _MAX_SAVED_CONTEXTS:
            self._saved.popitem(last=False)
        return h

    def _hot_session(self, name: str) -> int:
        """A policy session kept open across commands (continueSession: the TPM resets its
        digest after each command it authorised)."""
        s = self._sessions.get(name)
        if s is None:
            s = self._r(self._rt.start_policy_session)
            self._sessions[name] = s
        return s

    def _drop_session(self, name: str) -> None:
        """After a failed command: the session may hold half a policy, so it goes."""
        s = self._sessions.pop(name, None)
        if s is not None and self._raw is not None:
            with suppress(TpmError):
                self._r(self._rt.flush, s)

    def _diagnose_pcr_policy(self, label: str, policy: KeyPolicy) -> None:
        """After a PCR-bound key's command failed: raise PlatformStateNotApproved when the PCRs
        moved (else the caller re-raises the TPM's own error)."""
        if not policy.pcrs:
            return
        current = self._read_pcrs(policy.pcrs)
        got = pure.pcr_composite_digest([current[i] for i in sorted(policy.pcrs)])
        if got != policy.pcr_digest:
            raise PlatformStateNotApproved(
                label, policy.pcr_digest or b"", got, tuple(sorted(policy.pcrs))
            )

    def _certify_hot(self, obj: WrappedKey, signer: WrappedKey, data: bytes) -> Certification:
        """TPM2_Certify with both keys kept loaded; a PCR-bound signer's policy (PolicyPCR with
        the current values [+ PolicyLocality]) runs in a kept session."""
        signer_key, obj_key = self._cache_key(signer), self._cache_key(obj)
        self._use(signer, (obj_key,))
        oh = self._use(obj, (signer_key,))
        sh = self._use(signer, (obj_key,))  # still loaded (pinned above); refreshes its LRU place
        policy = signer.policy
        if not policy.pcrs and policy.locality is None:
            attest, sig = self._r(self._rt.certify, oh, sh, raw.PASSWORD, data)
            return Certification(attest, sig)
        s = self._hot_session(signer.kind)
        try:
            if policy.pcrs:
                self._r(self._rt.policy_pcr, s, policy.pcrs)
            if policy.locality is not None:
                self._r(self._rt.policy_locality, s, policy.locality)
            attest, sig = self._r(self._rt.certify, oh, sh, raw.Session(s), data)
        except TpmCommandError as err:
            self._drop_session(signer.kind)
            if not _is_link_error(err.rc):
                self._diagnose_pcr_policy(_KEY_LABEL[signer.kind], policy)
            raise
        return Certification(attest, sig)

    def _ticket_for(
        self, approval: PolicyApproval, policy: KeyPolicy
    ) -> tuple[tuple[bytes, ...], bytes, bool]:
        """The approval's TPMT_TK_VERIFIED, cached: it stays valid until the owner hierarchy's
        proof changes (TPM2_Clear). Returns (cache key, ticket, whether it came from cache)."""
        assert policy.fleet_key is not None
        tkey = (
            policy.fleet_key,
            approval.approved_policy,
            approval.policy_ref,
            approval.signature,
        )
        ticket = self._tickets.get(tkey)
        if ticket is not None:
            self._tickets.move_to_end(tkey)
            return tkey, ticket, True
        self._make_room(1, ())
        ticket = bytes(self._approval_ticket(approval, policy).marshal())
        self._tickets[tkey] = ticket
        if len(self._tickets) > _MAX_TICKETS:
            self._tickets.popitem(last=False)
        return tkey, ticket, False

    def _sign_hot(self, key: WrappedKey, message: bytes, approval: PolicyApproval) -> bytes:
        """TPM2_Hash + PolicyPCR/CommandCode(Sign)/PolicyAuthorize(cached ticket)/PolicyOR in a
        kept session + TPM2_Sign, the vAIK kept loaded."""
        policy = key.policy
        fleet_name = policy.fleet_key_name
        assert fleet_name is not None
        branches = self._vaik_branches(fleet_name, policy.policy_ref)
        for attempt in (1, 2):
            tkey, ticket, cached = self._ticket_for(approval, policy)
            if len(message) <= _MAX_HASH_BUFFER:
                digest, hash_ticket = self._r(self._rt.hash, message)
            else:
                self._make_room(1, ())  # a hash sequence is an object too
                d, t = self._hash(message)
                digest, hash_ticket = bytes(d), bytes(t.marshal())
            h = self._use(key)
            s = self._hot_session("vaik")
            try:
                self._r(self._rt.policy_pcr, s, AUTHKEY_PCRS)
                self._r(self._rt.policy_command_code, s, pure.TPM_CC_SIGN)
                self._r(
                    self._rt.policy_authorize,
                    s,
                    approval.approved_policy,
                    approval.policy_ref,
                    fleet_name,
                    ticket,
                )
                self._r(self._rt.policy_or, s, branches)
                return self._r(self._rt.sign, h, raw.Session(s), digest, hash_ticket)
            except TpmCommandError as err:
                self._drop_session("vaik")
                if _is_link_error(err.rc):
                    raise
                current = self._read_pcrs(AUTHKEY_PCRS)
                values = [current[i] for i in AUTHKEY_PCRS]
                if pure.vaik_sign_policy(values) != approval.approved_policy:
                    raise PlatformStateNotApproved(
                        "vAIK",
                        approval.approved_policy,
                        pure.pcr_composite_digest(values),
                        AUTHKEY_PCRS,
                    ) from err
                self._tickets.pop(tkey, None)  # a stale ticket (owner proof changed)?
                if not cached or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _vaik_branches(self, fleet_name: bytes, policy_ref: bytes) -> tuple[bytes, bytes]:
        """The vAIK PolicyOR branch digests (trial sessions), cached per fleet key and policyRef."""
        key = (fleet_name, policy_ref)
        if key not in self._branch_cache:
            self._branch_cache[key] = self._x(
                "TPM2_PolicyAuthorize", policies.vaik_branches, self._e, fleet_name, policy_ref
            )
        return self._branch_cache[key]

    def _approval_ticket(self, approval: PolicyApproval, policy: KeyPolicy) -> TPMT_TK_VERIFIED:
        """LoadExternal the vAIK's fleet key, VerifySignature(aHash) → ticket, flush the key."""
        assert policy.fleet_key is not None
        h = self._x(
            "TPM2_LoadExternal",
            self._e.load_external,
            public_from_bytes(policy.fleet_key),
            None,
            ESYS_TR.OWNER,
        )
        with self._loaded(h):
            try:
                r, s = decode_dss_signature(approval.signature)
            except ValueError as err:
                raise PolicyNotApproved(f"the approval signature is not DER ECDSA: {err}") from err
            if r.bit_length() > 256 or s.bit_length() > 256:
                raise PolicyNotApproved("the approval signature is not a P-256 signature")
            sig, _ = TPMT_SIGNATURE.unmarshal(
                bytes.fromhex("0018000b0020")
                + r.to_bytes(32, "big")
                + bytes.fromhex("0020")
                + s.to_bytes(32, "big")
            )
            a_hash = pure.approval_digest(approval.approved_policy, approval.policy_ref)
            try:
                return self._e.verify_signature(h, a_hash, sig)
            except TSS2_Exception as err:
                raise PolicyNotApproved(
                    "the fleet approval does not verify under the vAIK's fleet key "
                    f"(approved policy {approval.approved_policy.hex()}): {err}"
                ) from err

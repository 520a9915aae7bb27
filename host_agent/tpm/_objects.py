"""ESAPI basics of the host TPM adapter: loading and creating objects under the SRK, PCR policy.

:class:`TpmObjects` holds what every TPM operation of the adapter is built from: flushing what
it loaded (``_loaded``) and the policy sessions it starts (``_session``), the persistent SRK
(created if missing), loading a wrapped key with its parent chain and authorizing a PCR-bound
parent's USER role (``_load``, ``_user_auth``), creating an object under the SRK (``_create``),
reading PCRs and building or checking a PCR policy (``_read_pcrs``, ``_trial_pcr_policy``,
``_check_pcr_policy``), and hashing a message with a ticket (``_hash``). It is a base class of
the adapter, above :class:`~host_agent.tpm._connection.TpmConnection` and below the hot path,
sealing and migration, which all use it; it adds no state of its own. The adapter module
docstring ("AuthKey and ExgKey policy") tells how the PCR policy is checked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_HC
from tpm2_pytss.types import (
    TPM2_HANDLE,
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMS_SENSITIVE_CREATE,
    TPMT_TK_HASHCHECK,
)

from evidence import tpm2_policy as pure

from . import keys, policies
from ._connection import TpmConnection, log
from ._wire import private_from_bytes, public_from_bytes
from .errors import PlatformStateNotApproved, TpmError
from .port import AUTHKEY_PCRS, KeyPolicy, WrappedKey

__all__ = ["TpmObjects"]

_MAX_HASH_BUFFER = 1024
_KEY_LABEL = {"aik": "AIK", "authkey": "AuthKey", "vaik": "vAIK", "exgkey": "ExgKey"}


class TpmObjects(TpmConnection):
    """The ESAPI basics the adapter's operations share (module docstring)."""

    @contextmanager
    def _loaded(self, handle: ESYS_TR) -> Iterator[ESYS_TR]:
        try:
            yield handle
        finally:
            with suppress(TSS2_Exception):
                self._e.flush_context(handle)

    @contextmanager
    def _session(self, *, trial: bool = False) -> Iterator[ESYS_TR]:
        s = self._x("TPM2_StartAuthSession", policies.start_session, self._e, trial=trial)
        try:
            yield s
        finally:
            with suppress(TSS2_Exception):
                self._e.flush_context(s)

    # ------------------------------------------------------------------ SRK and loading

    def _srk(self) -> ESYS_TR:
        """ESYS_TR of the persistent SRK, creating and persisting it if missing.

        ESYS_TRs of persistent objects and NV indices are cached for the context's life: each
        ``tr_from_tpmpublic`` allocates ESAPI metadata that would otherwise pile up in a daemon.
        """
        if self._srk_tr is not None:
            return self._srk_tr
        if keys.SRK_HANDLE in self._handles(int(TPM2_HC.PERSISTENT_FIRST)):
            self._srk_tr = self._x(
                "ESYS_TR_FromTPMPublic", self._e.tr_from_tpmpublic, TPM2_HANDLE(keys.SRK_HANDLE)
            )
            return self._srk_tr
        h = self._x(
            "TPM2_CreatePrimary",
            self._e.create_primary,
            TPM2B_SENSITIVE_CREATE(),
            keys.srk_template(),
            ESYS_TR.OWNER,
        )[0]
        with self._loaded(h):
            persistent = self._x(
                "TPM2_EvictControl", self._e.evict_control, ESYS_TR.OWNER, h, keys.SRK_HANDLE
            )
        log.info("created the SRK at persistent handle 0x%08x", keys.SRK_HANDLE)
        self._srk_tr = persistent
        return persistent

    def _srk_exists(self) -> bool:
        return keys.SRK_HANDLE in self._handles(int(TPM2_HC.PERSISTENT_FIRST))

    def _check_pcr_policy(self, key: str, policy: KeyPolicy, session: ESYS_TR) -> None:
        """After a real PCR policy ran: compare the session digest with the approved one."""
        expected_session = self._pure_pcr_policy(policy)
        got = bytes(self._x("TPM2_PolicyGetDigest", self._e.policy_get_digest, session))
        if got != expected_session:
            current = self._read_pcrs(policy.pcrs)
            got_digest = pure.pcr_composite_digest([current[i] for i in sorted(policy.pcrs)])
            raise PlatformStateNotApproved(
                key, policy.pcr_digest or b"", got_digest, tuple(sorted(policy.pcrs))
            )

    @staticmethod
    def _pure_pcr_policy(policy: KeyPolicy) -> bytes:
        d = pure.empty_digest()
        if policy.pcrs:
            assert policy.pcr_digest is not None
            d = pure.policy_pcr(d, policy.pcrs, policy.pcr_digest)
        if policy.locality is not None:
            d = pure.policy_locality(d, policy.locality)
        return d

    @contextmanager
    def _user_auth(self, key: WrappedKey | None) -> Iterator[ESYS_TR]:
        """A session authorizing the USER role of a PCR-bound key (AuthKey, ExgKey), or PASSWORD."""
        if key is None or not key.policy.pcrs:
            yield ESYS_TR.PASSWORD
            return
        with self._session() as s:
            self._x(
                "TPM2_PolicyPCR", policies.apply_pcr_policy, self._e, s, key.policy, trial=False
            )
            self._check_pcr_policy(_KEY_LABEL[key.kind], key.policy, s)
            yield s

    def _load(self, key: WrappedKey) -> ESYS_TR:
        """Load ``key`` (and its parent chain, flushed again); the caller flushes the result."""
        pub = public_from_bytes(key.public)
        priv = private_from_bytes(key.private)
        if key.parent is None:
            return self._x("TPM2_Load", self._e.load, self._srk(), priv, pub)
        parent = self._load(key.parent)
        with self._loaded(parent), self._user_auth(key.parent) as auth:
            return self._x("TPM2_Load", self._e.load, parent, priv, pub, session1=auth)

    def _create(self, template: TPM2B_PUBLIC, data: bytes | None = None) -> tuple[bytes, bytes]:
        sens = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(data or b"")))
        priv, pub = self._x("TPM2_Create", self._e.create, self._srk(), sens, template)[:2]
        return pub.publicArea.marshal(), priv.marshal()

    # ------------------------------------------------------------------ PCRs

    def _read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        wanted = sorted(set(pcrs))
        for start in range(0, len(wanted), 8):
            chunk = wanted[start : start + 8]
            _, sel, digests = self._x(
                "TPM2_PCR_Read", self._e.pcr_read, policies.pcr_selection(chunk)
            )
            got = [
                i
                for s in sel
                for i in range(s.sizeofSelect * 8)
                if s.pcrSelect[i // 8] & (1 << (i % 8))
            ]
            for i, d in zip(got, digests, strict=True):
                out[i] = bytes(d)
        missing = [i for i in wanted if i not in out]
        if missing:
            raise TpmError(f"the TPM has no sha256 value for PCR(s) {missing}")
        return out

    def _current_pcr_policy(self, *, locality: bool) -> KeyPolicy:
        values = self._read_pcrs(AUTHKEY_PCRS)
        digest = pure.pcr_composite_digest([values[i] for i in AUTHKEY_PCRS])
        return KeyPolicy(pcrs=AUTHKEY_PCRS, pcr_digest=digest, locality=0 if locality else None)

    def _trial_pcr_policy(self, policy: KeyPolicy) -> bytes:
        with self._session(trial=True) as s:
            self._x("TPM2_PolicyPCR", policies.apply_pcr_policy, self._e, s, policy, trial=True)
            return bytes(self._x("TPM2_PolicyGetDigest", self._e.policy_get_digest, s))

    # ------------------------------------------------------------------ hashing

    def _hash(self, message: bytes) -> tuple[TPM2B_DIGEST, TPMT_TK_HASHCHECK]:
        if len(message) <= _MAX_HASH_BUFFER:
            digest, ticket = self._x(
                "TPM2_Hash", self._e.hash, message, TPM2_ALG.SHA256, ESYS_TR.OWNER
            )
            return digest, ticket
        seq = self._x("TPM2_HashSequenceStart", self._e.hash_sequence_start, b"", TPM2_ALG.SHA256)
        try:
            rest = message
            while len(rest) > _MAX_HASH_BUFFER:
                self._x(
                    "TPM2_SequenceUpdate", self._e.sequence_update, seq, rest[:_MAX_HASH_BUFFER]
                )
                rest = rest[_MAX_HASH_BUFFER:]
            digest, ticket = self._x(
                "TPM2_SequenceComplete", self._e.sequence_complete, seq, rest, ESYS_TR.OWNER
            )
            seq = None
            return digest, ticket
        finally:
            if seq is not None:
                with suppress(TSS2_Exception):
                    self._e.flush_context(seq)

"""``PytssHostTpm``: the one real adapter of the :class:`~host_agent.tpm.port.HostTpm` port.

This module holds the class and its public surface: the TPM operations, in ESAPI. Two concerns
live in its base classes, each in its own module: how it reaches the TPM (the TPM thread, the
ESAPI context, the lease and reconnection: :mod:`._connection`) and the attestation hot path
(kept keys, sessions and tickets, raw commands: :mod:`._hot`).

Theory of operation
-------------------
* **One thread.** An ESAPI context is not thread-safe and its calls block, so the adapter owns a
  single-thread executor; the ESAPI context is created, used and closed on that thread only. Public
  methods submit a closure and wait, so the API is synchronous and safe to call from any thread.
* **Load, use, flush — except the hot path.** swtpm holds 3 transient objects and there is no
  resource manager. Every operation loads the keys it needs, uses them and flushes them in
  ``finally``, except ``attest``/``certify``/``sign`` (the attestation hot path): they keep AIK,
  AuthKey and vAIKs loaded between calls, least recently used flushed first when slots run out;
  a key is TPM2_Load'ed once and context-saved, later it comes back by TPM2_ContextLoad (one
  slot, no parent, no unwrapping). Its policy sessions are kept too (continueSession: the TPM
  resets their digest after each command they authorised), and the fleet approval's
  TPM2_VerifySignature ticket is cached (valid until the owner hierarchy changes; a failing one
  is dropped and made again). Any other operation first flushes what the hot path keeps
  (:meth:`_quiesce`), so it starts from an empty TPM as before. Only the SRK is persistent;
  loading a child references its parent, which occupies a slot during the command. At open,
  transient objects and sessions left behind by a crashed client are flushed.
* **The hot path speaks the wire format** (:mod:`._raw`) on ESAPI's own TCTI: tss2-esys 3.2 on
  OpenSSL 3 spends 3.5-4 ms of CPU per command carrying a policy session (a new OpenSSL library
  context for each nonceCaller), more than swtpm's ECDSA signature itself (0.5-0.7 ms).
* **Sharing a simulator.** swtpm interleaves the commands of concurrent connections, so two
  agent processes (daemon and CLI) on the software root would eat each other's slots. Each
  holds an ``flock`` on ``<key_dir>/tpm.lock`` while it has anything in the TPM. ``per-call``
  takes it for one call (connect, flush leftovers, work, flush, disconnect); ``shared`` (the
  software root's default) keeps its connection and, with the lock, its loaded keys across
  calls, and gives the lock up (flushing what it keeps) as soon as another process waits: a
  waiter holds ``tpm.waiting`` shared, which the holder checks after each call and every
  ``lease_poll`` seconds while idle. A broken connection, or a TPM that lost our handles (it
  restarted), is reconnected and the call run once more when it changes nothing in the TPM.
  While it holds the lease on a swtpm, the hot path's raw commands go over one connection to
  swtpm's server socket kept open (tcti-swtpm connects for each command); it is closed before
  any ESAPI command, before the lease is given up and after ``lease_poll`` without a command.
  A hardware TPM behind ``/dev/tpmrm0`` keeps one connection (the kernel isolates clients).
* **Wrapped once.** ``TSS2_Exception`` is caught right at the ESAPI call (:meth:`_x`) and raised
  as :class:`TpmCommandError` naming the TPM command; nothing above sees a tpm2-pytss type.

AuthKey and ExgKey policy
-------------------------
``PolicyPCR(sha256:0-8 = values at creation) + PolicyLocality(0)``. Whether PolicyLocality(0)
holds depends on the TPM path (the locality the TCTI sends at): ``ensure_host_keys`` probes it
with a throwaway sealed object and leaves the term out, with a warning, where it does not.
Measured: it holds over the swtpm TCTI (TCP and unix socket), so the software root's AuthKey
includes it (``tests/sim/test_host_tpm_keys.py::test_authkey_policy_includes_locality_zero``).
In a real session PolicyPCR is given an empty pcrDigest (the TPM uses the current values); the
session digest is then compared with the approved one, so a changed platform is reported as
:class:`PlatformStateNotApproved` with both digests, not as an opaque TPM_RC_POLICY_FAIL.

vAIK design (ARCHITECTURE.md §2)
--------------------------------
A vAIK is a restricted ECDSA P-256 signing key that is *not* fixedTPM/fixedParent, created under
the SRK and kept only wrapped. Its ``authPolicy`` is ``PolicyOR{A, B}`` with

* ``A = PolicyAuthorize(Name(fleet key), policyRef)``: signing (or any USER-role use) needs a policy
  the fleet key approved. The approved policy is ``PolicyPCR(sha256:0-8 = approved host state) +
  PolicyCommandCode(TPM2_Sign)``: one fleet approval per approved host platform state, valid on
  every host in that state, so the key keeps working after migrating to another approved host.
  To sign, the adapter LoadExternal's the fleet public key, gets a TPMT_TK_VERIFIED ticket with
  ``TPM2_VerifySignature(aHash)`` (``aHash = SHA-256(approvedPolicy ‖ policyRef)``), flushes it,
  runs PolicyPCR (current values) + PolicyCommandCode(Sign), PolicyAuthorize(ticket), PolicyOR.
* ``B = PolicyCommandCode(TPM2_Duplicate)``: the DUP role; the agent duplicates a vAIK only to a
  certified ExgKey (a restricted decrypt, fixedTPM+fixedParent key; checked here).

The ADMIN role (the object of ``TPM2_Certify``, i.e. CertvAIK) uses the empty authValue
(``adminWithPolicy`` clear): certifying a key reveals nothing and needs no policy.

Known limit, and the proposed fix: branch B lets *whoever runs commands on this TPM* duplicate a
vAIK to any new parent, including a key whose private part they hold; the agent only refuses to
do so (``duplicate`` checks for a restricted fixedTPM decrypt key). Against root on an
approved host that is not enough. Binding the target in the TPM needs the fleet in the loop:
drop branch B and let the fleet approve, through branch A, ``PolicyDuplicationSelect(Name(ExgKey))
+ PolicyCommandCode(TPM2_Duplicate)`` for each migration after checking CertExgKey. The policy
shape above is the one ARCHITECTURE.md §2 and issue 3 specify, so it is kept until that change
is agreed.

A duplicate uses an inner wrapper (AES-128-CFB, TPM-generated key) and the outer seed to the
ExgKey; the imported key keeps its public area (same Name) and is stored wrapped under the ExgKey
(its :class:`WrappedKey` names that parent), so the migrated vAIK signs with the same public key.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_NT,
    TPM2_PT_NV,
    TPM2_SE,
    TPMA_NV,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (
    TPM2_HANDLE,
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMS_NV_PUBLIC,
    TPMS_SENSITIVE_CREATE,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from evidence import tpm2_policy as pure
from evidence.tpm2_policy import PolicyApproval

from . import _raw as raw
from . import ek, keys, policies
from ._connection import _DEFAULT_OBJECT_SLOTS, Connection
from ._hot import _KEY_LABEL, _MAX_HASH_BUFFER, HotPath
from ._raw import RawTpm
from ._wire import SealedBlob, private_from_bytes, public_from_bytes, sym_aes128cfb, unmarshal
from .errors import HostKeysMissing, PlatformStateNotApproved, PolicyNotApproved, TpmError
from .keyfile import HostKeyFile
from .port import (
    AUTHKEY_PCRS,
    VAIK_POLICY_REF,
    Attestation,
    Certification,
    DuplicationBlob,
    HostKeyReport,
    KeyPolicy,
    KeyRef,
    WrappedKey,
)

__all__ = ["Attestation", "Connection", "HostKeysMissing", "PytssHostTpm"]

log = logging.getLogger(__name__)

_NV_OWNER_FIRST, _NV_OWNER_LAST = 0x01800000, 0x01BFFFFF
_TPM_GENERATED_VALUE = b"\xffTCG"
_MAX_SEAL = 128


class PytssHostTpm(HotPath):
    """Host TPM over tpm2-pytss ESAPI (see the module docstring).

    Args:
        tcti: the TCTI string (``"device:/dev/tpmrm0"``, ``"swtpm:path=…"``).
        key_dir: where the host keys' wrapped blobs live (``host_keys.json``).
        root: ``"hardware"`` or ``"software"`` (reported by ``tpm info``).
        on_close: called after the ESAPI context is closed (the software root stops its swtpm).
        connection: ``"persistent"`` keeps one ESAPI context open (a TPM behind a resource
            manager, ``/dev/tpmrm0``); ``"per-call"`` connects for each public call, under an
            inter-process lock, and disconnects after it (a simulator shared by processes).
    """

    def __init__(
        self,
        tcti: str,
        key_dir: Path,
        *,
        root: Literal["hardware", "software"] = "hardware",
        on_close: Callable[[], None] | None = None,
        connection: Connection = "persistent",
        lease_poll: float = 0.02,
    ) -> None:
        if connection not in ("persistent", "shared", "per-call"):
            raise ValueError(
                f"connection must be 'persistent', 'shared' or 'per-call', got {connection!r}"
            )
        self._mode: Connection = connection
        self._per_call = connection == "per-call"
        self._tcti = tcti
        self._keyfile = HostKeyFile(Path(key_dir))
        self._root: Literal["hardware", "software"] = root
        self._on_close = on_close
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-tpm")
        self._esys: ESAPI | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._ek_cache: dict[str, bytes] = {}
        self._branch_cache: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {}
        self._srk_tr: ESYS_TR | None = None
        self._nv_trs: dict[int, ESYS_TR] = {}
        # hot path (attest/certify/sign): what stays in the TPM between calls, see _quiesce
        self._capacity = _DEFAULT_OBJECT_SLOTS
        self._raw: RawTpm | None = None
        # shared mode on swtpm: the hot path's commands go over one kept connection (_raw)
        self._kept_address = raw.swtpm_address(tcti) if connection == "shared" else None
        self._resident: OrderedDict[bytes, int] = OrderedDict()  # key → TPM handle
        self._saved: OrderedDict[bytes, bytes] = OrderedDict()  # key → TPMS_CONTEXT
        self._sessions: dict[str, int] = {}  # hot policy sessions, TPM handles
        self._tickets: OrderedDict[tuple[bytes, ...], bytes] = OrderedDict()  # TPMT_TK_VERIFIED
        self._host_keys: tuple[tuple[int, int, int], dict[str, WrappedKey]] | None = None
        # shared mode: the lease on <key_dir>/tpm.lock and the thread that gives it up
        self._lease_fd: int | None = None
        self._yielded = False
        self._lease_poll = lease_poll
        self._lease_wake = threading.Event()
        self._probe_lock = threading.Lock()
        self._lease_watch: threading.Thread | None = None
        self._stats = {"reconnects": 0, "lease_yields": 0, "loads": 0, "context_loads": 0}
        self._stats["kept_connects"] = 0
        try:
            self._call(lambda: None)  # connects (and, per call, disconnects): fails early
        except BaseException:
            self._executor.shutdown(wait=True)
            raise
        if connection == "shared":
            self._lease_watch = threading.Thread(
                target=self._watch_lease, name="host-tpm-lease", daemon=True
            )
            self._lease_watch.start()

    # ------------------------------------------------------------------ plumbing

    @property
    def root(self) -> Literal["hardware", "software"]:
        return self._root

    @property
    def tcti(self) -> str:
        return self._tcti

    @property
    def connection(self) -> Connection:
        return self._mode

    def stats(self) -> dict[str, int]:
        """Counters of the connection and the object cache (for benchmarks and ``tpm info``);
        ``kept_connects``: connections the hot path opened to swtpm (shared mode)."""
        out = dict(self._stats)
        rt = self._raw
        out["kept_connects"] += rt.connects if rt is not None else 0
        return out

    def close(self) -> None:
        """Close the ESAPI context on its thread, stop the worker, then run ``on_close``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True

            def shut() -> None:
                try:
                    self._quiesce()
                    self._disconnect()
                finally:
                    if self._lease_fd is not None:
                        os.close(self._lease_fd)
                        self._lease_fd = None

            self._executor.submit(shut).result()
        self._lease_wake.set()
        self._executor.shutdown(wait=True)
        if self._lease_watch is not None:
            self._lease_watch.join(5)
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> PytssHostTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def pcr_values(self, pcrs: Sequence[int] = AUTHKEY_PCRS) -> dict[int, bytes]:
        """Current sha256 PCR values."""
        return self._call(lambda: self._read_pcrs(pcrs), hot=True, retry=True)

    def _current_pcr_policy(self, *, locality: bool) -> KeyPolicy:
        values = self._read_pcrs(AUTHKEY_PCRS)
        digest = pure.pcr_composite_digest([values[i] for i in AUTHKEY_PCRS])
        return KeyPolicy(pcrs=AUTHKEY_PCRS, pcr_digest=digest, locality=0 if locality else None)

    def _trial_pcr_policy(self, policy: KeyPolicy) -> bytes:
        with self._session(trial=True) as s:
            self._x("TPM2_PolicyPCR", policies.apply_pcr_policy, self._e, s, policy, trial=True)
            return bytes(self._x("TPM2_PolicyGetDigest", self._e.policy_get_digest, s))

    # ------------------------------------------------------------------ sealing

    def seal(self, data: bytes, *, pcrs: Sequence[int] | None = None) -> bytes:
        if not isinstance(data, bytes):
            raise TypeError("seal() takes bytes")
        if not 0 < len(data) <= _MAX_SEAL:
            raise ValueError(f"seal() takes 1..{_MAX_SEAL} bytes, got {len(data)}")

        def run() -> bytes:
            policy = KeyPolicy()
            auth_policy = b""
            if pcrs:
                values = self._read_pcrs(pcrs)
                digest = pure.pcr_composite_digest([values[i] for i in sorted(set(pcrs))])
                policy = KeyPolicy(pcrs=tuple(sorted(set(pcrs))), pcr_digest=digest)
                auth_policy = self._trial_pcr_policy(policy)
            pub, priv = self._create(keys.sealed_template(auth_policy or None), data)
            return SealedBlob(pub, priv, policy).to_bytes()

        return self._call(run)

    def unseal(self, blob: bytes) -> bytes:
        sealed = SealedBlob.from_bytes(blob)
        pub, priv = public_from_bytes(sealed.public), private_from_bytes(sealed.private)
        policy = sealed.policy

        def run() -> bytes:
            h = self._x("TPM2_Load", self._e.load, self._srk(), priv, pub)
            with self._loaded(h):
                if not policy.pcrs:
                    return bytes(self._x("TPM2_Unseal", self._e.unseal, h))
                with self._session() as s:
                    self._x(
                        "TPM2_PolicyPCR", policies.apply_pcr_policy, self._e, s, policy, trial=False
                    )
                    self._check_pcr_policy("sealed data", policy, s)
                    return bytes(self._x("TPM2_Unseal", self._e.unseal, h, session1=s))

        return self._call(run)

    # ------------------------------------------------------------------ NV counters

    @staticmethod
    def _check_index(index: int) -> None:
        if not _NV_OWNER_FIRST <= index <= _NV_OWNER_LAST:
            raise ValueError(
                f"NV counter index must be in the owner range 0x{_NV_OWNER_FIRST:08x}.."
                f"0x{_NV_OWNER_LAST:08x}, got 0x{index:08x}"
            )

    def _nv_tr(self, index: int) -> ESYS_TR:
        if index not in self._nv_trs:
            self._nv_trs[index] = self._x(
                "ESYS_TR_FromTPMPublic", self._e.tr_from_tpmpublic, TPM2_HANDLE(index)
            )
        return self._nv_trs[index]

    def _counter_value(self, index: int) -> int:
        tr = self._nv_tr(index)
        data = self._x("TPM2_NV_Read", self._e.nv_read, tr, 8, 0, ESYS_TR.OWNER)
        return int.from_bytes(bytes(data), "big")

    def counter_define(self, index: int) -> int:
        """Define (if missing) and initialize an NV counter; returns its current value."""
        self._check_index(index)

        def run() -> int:
            if index not in self._handles(int(TPM2_HC.NV_INDEX_FIRST)):
                attrs = (
                    TPMA_NV.OWNERWRITE
                    | TPMA_NV.OWNERREAD
                    | TPMA_NV.NO_DA
                    | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT)
                )
                public = TPM2B_NV_PUBLIC(
                    nvPublic=TPMS_NV_PUBLIC(
                        nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=8
                    )
                )
                tr = self._x("TPM2_NV_DefineSpace", self._e.nv_define_space, None, public)
                self._nv_trs[index] = tr
                self._x("TPM2_NV_Increment", self._e.nv_increment, tr, ESYS_TR.OWNER)
                log.info("defined NV counter 0x%08x", index)
            else:
                pub, _ = self._x("TPM2_NV_ReadPublic", self._e.nv_read_public, self._nv_tr(index))
                nt = (int(pub.nvPublic.attributes) >> 4) & 0xF
                if nt != int(TPM2_NT.COUNTER):
                    raise TpmError(f"NV index 0x{index:08x} exists and is not a counter")
                if not int(pub.nvPublic.attributes) & int(TPMA_NV.WRITTEN):
                    self._x(
                        "TPM2_NV_Increment", self._e.nv_increment, self._nv_tr(index), ESYS_TR.OWNER
                    )
            return self._counter_value(index)

        return self._call(run)

    def counter_read(self, index: int) -> int:
        self._check_index(index)
        return self._call(lambda: self._counter_value(index), hot=True, retry=True)

    def counter_increment(self, index: int) -> int:
        self._check_index(index)

        def run() -> int:
            self._x("TPM2_NV_Increment", self._e.nv_increment, self._nv_tr(index), ESYS_TR.OWNER)
            return self._counter_value(index)

        return self._call(run)

    # ------------------------------------------------------------------ EK

    def _nv_max(self) -> int:
        _, data = self._x(
            "TPM2_GetCapability",
            self._e.get_capability,
            TPM2_CAP.TPM_PROPERTIES,
            TPM2_PT_NV.BUFFER_MAX,
            1,
        )
        for p in data.data.tpmProperties:
            if int(p.property) == int(TPM2_PT_NV.BUFFER_MAX):
                return min(int(p.value), 1024)
        return 512

    def _nv_read_all(self, index: int) -> bytes:
        if index not in self._handles(int(TPM2_HC.NV_INDEX_FIRST)):
            raise NoSuchIndex(index)
        tr = self._nv_tr(index)
        pub, _ = self._x("TPM2_NV_ReadPublic", self._e.nv_read_public, tr)
        size = int(pub.nvPublic.dataSize)
        chunk = self._nv_max()
        out = bytearray()
        while len(out) < size:
            n = min(chunk, size - len(out))
            out += bytes(self._x("TPM2_NV_Read", self._e.nv_read, tr, n, len(out), tr))
        return bytes(out)

    def _ek_certs(self) -> list[tuple[int, bytes]]:
        present = set(self._handles(int(TPM2_HC.NV_INDEX_FIRST)))
        out = []
        for index in ek.EK_CERT_INDICES:
            if index in present:
                data = self._nv_read_all(index)
                out.append((index, data[: ek.der_length(data)]))
        return out

    def ek_certificates(self) -> list[tuple[int, bytes]]:
        return self._call(self._ek_certs)

    def _ek_template(self, kind: str) -> TPM2B_PUBLIC:
        present = set(self._handles(int(TPM2_HC.NV_INDEX_FIRST)))
        _, template = create_ek_template(ek.ek_template_name(kind, present), self._nv_read_all)
        return template

    def _create_ek(self, kind: str) -> ESYS_TR:
        template = self._ek_template(kind)
        return self._x(
            "TPM2_CreatePrimary",
            self._e.create_primary,
            TPM2B_SENSITIVE_CREATE(),
            template,
            ESYS_TR.ENDORSEMENT,
        )[0]

    def ek_public(self, kind: Literal["rsa", "ecc"] = "rsa") -> bytes:
        def run() -> bytes:
            if kind not in self._ek_cache:
                h = self._create_ek(kind)
                with self._loaded(h):
                    pub = self._x("TPM2_ReadPublic", self._e.read_public, h)[0]
                self._ek_cache[kind] = pub.publicArea.marshal()
            return self._ek_cache[kind]

        return self._call(run)

    @contextmanager
    def _ek_session(self, handle: ESYS_TR) -> Iterator[ESYS_TR]:
        """A policy session (in the EK's nameAlg) satisfying the EK's authPolicy."""
        pub = self._x("TPM2_ReadPublic", self._e.read_public, handle)[0].publicArea
        s = self._x(
            "TPM2_StartAuthSession",
            self._e.start_auth_session,
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            pub.nameAlg,
        )
        try:
            self._x("TPM2_PolicySecret/PolicyOR", ek.apply_ek_policy, self._e, s, pub)
            yield s
        finally:
            with suppress(TSS2_Exception):
                self._e.flush_context(s)

    def activate_credential(
        self,
        credential_blob: bytes,
        encrypted_secret: bytes,
        ek_kind: Literal["rsa", "ecc"] = "rsa",
    ) -> bytes:
        blob = unmarshal(TPM2B_ID_OBJECT, credential_blob, "credential blob (TPM2B_ID_OBJECT)")
        secret = unmarshal(
            TPM2B_ENCRYPTED_SECRET, encrypted_secret, "encrypted secret (TPM2B_ENCRYPTED_SECRET)"
        )

        def run() -> bytes:
            aik = self._host_key("aik")
            aik_h = self._load(aik)
            with self._loaded(aik_h):
                ek_h = self._create_ek(ek_kind)
                with self._loaded(ek_h), self._ek_session(ek_h) as s:
                    cert_info = self._x(
                        "TPM2_ActivateCredential",
                        self._e.activate_credential,
                        aik_h,
                        ek_h,
                        blob,
                        secret,
                        session1=ESYS_TR.PASSWORD,
                        session2=s,
                    )
            return bytes(cert_info)

        return self._call(run)

    # ------------------------------------------------------------------ host keys

    def _host_key_map(self) -> dict[str, WrappedKey]:
        """The host key file, parsed again only when it changed on disk (``init`` in another
        process may have written it)."""
        try:
            st = self._keyfile.path.stat()
        except OSError:
            self._host_keys = None
            return self._keyfile.read()  # {} when missing; a clear TpmError otherwise
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._host_keys is None or self._host_keys[0] != sig:
            self._host_keys = (sig, self._keyfile.read())
        return dict(self._host_keys[1])

    def _host_key(self, kind: str) -> WrappedKey:
        key = self._host_key_map().get(kind)
        if key is None:
            raise HostKeysMissing(
                f"no {_KEY_LABEL[kind]} in {self._keyfile.path}: run `vtpm-host init` first"
            )
        return key

    def _probe_locality(self) -> bool:
        """Does PolicyLocality(0) hold on this TPM path? (a throwaway sealed object tells)."""
        d = pure.policy_locality(pure.empty_digest(), 0)
        pub, priv = self._create(keys.sealed_template(d), b"probe")
        h = self._x(
            "TPM2_Load",
            self._e.load,
            self._srk(),
            private_from_bytes(priv),
            public_from_bytes(pub),
        )
        with self._loaded(h), self._session() as s:
            self._x(
                "TPM2_PolicyLocality",
                policies.apply_pcr_policy,
                self._e,
                s,
                KeyPolicy(locality=0),
                trial=False,
            )
            try:
                self._e.unseal(h, session1=s)
            except TSS2_Exception as err:
                log.warning(
                    "PolicyLocality(0) does not hold on %s (%s): AuthKey without it",
                    self._tcti,
                    err,
                )
                return False
        return True

    def ensure_host_keys(self) -> HostKeyReport:
        """Create whatever of SRK, AIK, AuthKey is missing; idempotent."""

        def run() -> HostKeyReport:
            created: list[str] = []
            if not self._srk_exists():
                self._srk()
                created.append("srk")
            host_keys = self._keyfile.read()
            if "aik" not in host_keys:
                pub, priv = self._create(keys.aik_template())
                host_keys["aik"] = WrappedKey("aik", pub, priv)
                created.append("aik")
                self._keyfile.write(host_keys)
            if "authkey" not in host_keys:
                policy = self._current_pcr_policy(locality=self._probe_locality())
                auth_policy = self._trial_pcr_policy(policy)
                pub, priv = self._create(keys.authkey_template(auth_policy))
                host_keys["authkey"] = WrappedKey("authkey", pub, priv, policy)
                created.append("authkey")
                self._keyfile.write(host_keys)
            authkey = host_keys["authkey"]
            return HostKeyReport(
                created=tuple(created),
                aik_name=host_keys["aik"].name,
                authkey_name=authkey.name,
                authkey_policy=self._pure_pcr_policy(authkey.policy),
                authkey_locality=authkey.policy.locality is not None,
            )

        return self._call(run)

    def host_key_public(self, key: Literal["aik", "authkey"]) -> bytes:
        return self._call(lambda: self._host_key(key).public, hot=True, retry=True)

    def aik_public(self) -> bytes:
        return self.host_key_public("aik")

    def aik_name(self) -> bytes:
        return self._call(lambda: self._host_key("aik").name, hot=True, retry=True)

    def authkey_policy(self) -> bytes:
        return self._call(
            lambda: self._pure_pcr_policy(self._host_key("authkey").policy), hot=True, retry=True
        )

    def platform_state_approved(self) -> bool:
        """Whether PCR0-8 now hold the values AuthKey was bound to (i.e. AuthKey is usable)."""

        def run() -> bool:
            policy = self._host_key("authkey").policy
            values = self._read_pcrs(policy.pcrs)
            current = pure.pcr_composite_digest([values[i] for i in sorted(policy.pcrs)])
            return current == policy.pcr_digest

        return self._call(run, hot=True, retry=True)

    # ------------------------------------------------------------------ per-VM keys

    def create_vaik(self, fleet_key: bytes, policy_ref: bytes = VAIK_POLICY_REF) -> WrappedKey:
        """Create a vAIK under the SRK whose signing needs the fleet key's approval."""
        fleet = _load_fleet_key(fleet_key)
        if len(policy_ref) > pure.DIGEST_SIZE:
            raise ValueError(f"policy_ref is at most {pure.DIGEST_SIZE} bytes")
        name = pure.fleet_key_name(fleet)

        def run() -> WrappedKey:
            policy = self._x(
                "TPM2_PolicyAuthorize/PolicyOR", policies.vaik_policy, self._e, name, policy_ref
            )
            pub, priv = self._create(keys.vaik_template(policy))
            return WrappedKey(
                "vaik",
                pub,
                priv,
                KeyPolicy(fleet_key=pure.fleet_key_public(fleet), policy_ref=policy_ref),
            )

        return self._call(run)

    def create_exgkey(self) -> WrappedKey:
        """Create an ExgKey (import parent for migration), bound to PCR0-8 like AuthKey."""

        def run() -> WrappedKey:
            authkey = self._host_key_map().get("authkey")
            locality = authkey is not None and authkey.policy.locality is not None
            policy = self._current_pcr_policy(locality=locality)
            pub, priv = self._create(keys.exgkey_template(self._trial_pcr_policy(policy)))
            return WrappedKey("exgkey", pub, priv, policy)

        return self._call(run)

    def _resolve(self, ref: KeyRef) -> WrappedKey:
        if isinstance(ref, WrappedKey):
            return ref
        if ref in ("aik", "authkey"):
            return self._host_key(ref)
        raise ValueError(f"key must be 'aik', 'authkey' or a WrappedKey, got {ref!r}")

    def certify(self, obj: KeyRef, signer: KeyRef, qualifying_data: bytes) -> Certification:
        """TPM2_Certify(objectHandle=obj, signHandle=signer, qualifyingData)."""
        if not isinstance(qualifying_data, bytes) or len(qualifying_data) > 64:
            raise ValueError("qualifying_data must be bytes of at most 64")

        def run() -> Certification:
            o, s = self._resolve(obj), self._resolve(signer)
            if s.kind not in ("aik", "authkey"):
                raise ValueError(f"certify: the signer must be the AIK or AuthKey, not {s.kind}")
            return self._certify_hot(o, s, qualifying_data)

        return self._call(run, hot=True, retry=True)

    def approved_sign_policy(self, pcr_values: Mapping[int, bytes] | None = None) -> bytes:
        """The policy digest a fleet approval for vAIK signing covers.

        ``PolicyPCR(sha256:0-8 = pcr_values) + PolicyCommandCode(TPM2_Sign)``, by a trial session;
        ``pcr_values`` defaults to this host's current values.
        """

        def run() -> bytes:
            values = pcr_values if pcr_values is not None else self._read_pcrs(AUTHKEY_PCRS)
            digest = pure.pcr_composite_digest([values[i] for i in AUTHKEY_PCRS])
            return self._x(
                "TPM2_PolicyPCR", policies.approved_sign_policy, self._e, AUTHKEY_PCRS, digest
            )

        return self._call(run, hot=True, retry=True)

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

    @staticmethod
    def _check_message(message: object) -> bytes:
        if not isinstance(message, bytes):
            raise TypeError("sign() takes bytes")
        if message[:4] == _TPM_GENERATED_VALUE:
            raise ValueError(
                "refusing to sign a message starting with TPM_GENERATED_VALUE (0xff544347): "
                "a restricted key must never sign what could pass for a TPM-generated structure"
            )
        return message

    @staticmethod
    def _check_vaik(key: WrappedKey, approval: PolicyApproval, what: str = "sign()") -> None:
        if not isinstance(key, WrappedKey) or key.kind != "vaik" or key.policy.fleet_key is None:
            kind = key.kind if isinstance(key, WrappedKey) else type(key).__name__
            raise ValueError(f"{what} needs a vAIK, got a {kind}")
        if approval.policy_ref != key.policy.policy_ref:
            raise PolicyNotApproved(
                f"approval is for policyRef {approval.policy_ref.hex()}, this vAIK needs "
                f"{key.policy.policy_ref.hex()}"
            )

    def sign(self, key: WrappedKey, message: bytes, approval: PolicyApproval) -> bytes:
        """TPM2_Hash (ticket) + TPM2_Sign by a vAIK, authorized by a fleet approval.

        Raises:
            ValueError: the message starts with TPM_GENERATED_VALUE (it could pose as a quote),
                or ``key`` is not a vAIK.
            PolicyNotApproved: the approval is for another policyRef or does not verify.
            PlatformStateNotApproved: this host's PCR0-8 are not the approved state.
        """
        self._check_message(message)
        self._check_vaik(key, approval)
        return self._call(lambda: self._sign_hot(key, message, approval), hot=True, retry=True)

    def attest(
        self,
        key: WrappedKey,
        qualifying_data: bytes,
        message: bytes | Future[bytes],
        approval: PolicyApproval,
        *,
        message_timeout: float | None = None,
    ) -> Attestation:
        """One attestation in one call: CertAuthKey (AuthKey by AIK) and CertvAIK (``key`` by
        AuthKey) over ``qualifying_data``, then ``key`` signs ``message``.

        ``message`` may be a future (the vPCRs are still being read): the certifications do not
        need it, so they run first; if it is ready then, the signature follows in the same TPM
        job, otherwise the TPM serves other callers until it is, and the signature is a second
        job. Its exception, if it fails, is raised here and nothing is signed.

        Raises:
            as :meth:`certify` and :meth:`sign`; whatever the message future raises;
            ``TimeoutError`` when it is not ready within ``message_timeout``.
        """
        if not isinstance(qualifying_data, bytes) or len(qualifying_data) > 64:
            raise ValueError("qualifying_data must be bytes of at most 64")
        self._check_vaik(key, approval, "attest()")
        if not isinstance(message, Future):
            self._check_message(message)

        def first() -> tuple[Certification, Certification, bytes | None, bytes | None]:
            aik, authkey = self._host_key("aik"), self._host_key("authkey")
            cert_authkey = self._certify_hot(authkey, aik, qualifying_data)
            cert_vaik = self._certify_hot(key, authkey, qualifying_data)
            if isinstance(message, Future):
                if not message.done():
                    return cert_authkey, cert_vaik, None, None
                ready = self._check_message(message.result())
            else:
                ready = message
            return cert_authkey, cert_vaik, ready, self._sign_hot(key, ready, approval)

        cert_authkey, cert_vaik, signed, signature = self._call(first, hot=True, retry=True)
        if signature is None:
            assert isinstance(message, Future)
            signed = self._check_message(message.result(message_timeout))
            signature = self._call(
                lambda: self._sign_hot(key, signed, approval), hot=True, retry=True
            )
        assert signed is not None
        return Attestation(cert_authkey, cert_vaik, signed, signature)

    # ------------------------------------------------------------------ migration

    def duplicate(self, key: WrappedKey, new_parent_public: bytes) -> DuplicationBlob:
        """TPM2_Duplicate a vAIK towards an ExgKey public area (inner + outer wrapper).

        Raises:
            ValueError: ``key`` is not a vAIK, or the new parent is not a restricted decrypt,
                fixedTPM + fixedParent key (a certified ExgKey).
        """
        if key.kind != "vaik" or key.policy.fleet_key_name is None:
            raise ValueError(f"duplicate() moves vAIKs only, got a {key.kind}")
        target = public_from_bytes(new_parent_public)
        attrs = int(target.publicArea.objectAttributes)
        need = int(
            TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.DECRYPT
            | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
        )
        if attrs & need != need or attrs & int(TPMA_OBJECT.SIGN_ENCRYPT):
            raise ValueError(
                "the new parent must be a restricted decrypt key with fixedTPM and fixedParent "
                f"(an ExgKey); its attributes are 0x{attrs:08x}"
            )
        fleet_name = key.policy.fleet_key_name

        def run() -> DuplicationBlob:
            # The key is leaving: this call quiesced the TPM, and its saved context goes too, so
            # nothing of it stays here but the wrapped blob the store holds until the commit.
            self._saved.pop(self._cache_key(key), None)
            branches = self._vaik_branches(fleet_name, key.policy.policy_ref)
            h = self._load(key)
            with self._loaded(h):
                parent = self._x(
                    "TPM2_LoadExternal", self._e.load_external, target, None, ESYS_TR.OWNER
                )
                with self._loaded(parent), self._session() as s:
                    self._x(
                        "TPM2_PolicyCommandCode",
                        policies.apply_vaik_branch_duplicate,
                        self._e,
                        s,
                        branches,
                    )
                    enc_key, dup, seed = self._x(
                        "TPM2_Duplicate",
                        self._e.duplicate,
                        h,
                        parent,
                        TPM2B_DATA(),
                        sym_aes128cfb(),
                        session1=s,
                    )
            return DuplicationBlob(
                public=key.public,
                duplicate=dup.marshal(),
                encrypted_seed=seed.marshal(),
                encryption_key=bytes(enc_key),
                policy=key.policy,
            )

        return self._call(run)

    def import_key(self, blob: DuplicationBlob, parent: WrappedKey) -> WrappedKey:
        """TPM2_Import a duplicated vAIK under ``parent`` (this host's ExgKey)."""
        if parent.kind != "exgkey":
            raise ValueError(f"import_key() imports under an ExgKey, got a {parent.kind}")
        pub = public_from_bytes(blob.public)
        dup = unmarshal(TPM2B_PRIVATE, blob.duplicate, "duplicate (TPM2B_PRIVATE)")
        seed = unmarshal(
            TPM2B_ENCRYPTED_SECRET, blob.encrypted_seed, "seed (TPM2B_ENCRYPTED_SECRET)"
        )

        def run() -> WrappedKey:
            ph = self._load(parent)
            with self._loaded(ph), self._user_auth(parent) as auth:
                priv = self._x(
                    "TPM2_Import",
                    self._e.import_,
                    ph,
                    TPM2B_DATA(blob.encryption_key),
                    pub,
                    dup,
                    seed,
                    sym_aes128cfb(),
                    session1=auth,
                )
            return WrappedKey("vaik", blob.public, priv.marshal(), blob.policy, parent)

        return self._call(run)


def _load_fleet_key(fleet_key: bytes) -> ec.EllipticCurvePublicKey:
    if not isinstance(fleet_key, bytes):
        raise TypeError("fleet_key must be DER SubjectPublicKeyInfo bytes")
    try:
        key = serialization.load_der_public_key(fleet_key)
    except ValueError as err:
        raise ValueError(f"fleet_key is not a DER SubjectPublicKeyInfo: {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the fleet key must be ECC NIST P-256")
    return key

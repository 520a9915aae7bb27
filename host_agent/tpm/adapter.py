"""``PytssHostTpm``: the one real adapter of the :class:`~host_agent.tpm.port.HostTpm` port.

This module holds the class and its public surface: the TPM operations, in ESAPI (host keys, per-VM
keys and their certification and signing, the EK). Other concerns live in its base classes, each
in its own module: how it reaches the TPM (the TPM thread, the ESAPI context, the lease and
reconnection: :mod:`._connection`), the ESAPI basics every operation uses (SRK, loading and
creating objects, PCR policy sessions: :mod:`._objects`), the attestation hot path (kept keys,
sessions and tickets, raw commands: :mod:`._hot`), sealing and NV counters (:mod:`._storage`)
and a vAIK's duplication and import (:mod:`._migration`).

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
is agreed. How a duplicate is wrapped and imported: :mod:`._migration`.
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
    TPM2_HC,
    TPM2_SE,
)
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import create_ek_template

from evidence import tpm2_policy as pure
from evidence.tpm2_policy import PolicyApproval

from . import _raw as raw
from . import ek, keys, policies
from ._connection import _DEFAULT_OBJECT_SLOTS, Connection
from ._migration import KeyMigration
from ._objects import _KEY_LABEL
from ._raw import RawTpm
from ._storage import TpmStorage
from ._wire import private_from_bytes, public_from_bytes, unmarshal
from .errors import HostKeysMissing, PolicyNotApproved
from .keyfile import HostKeyFile
from .port import (
    AUTHKEY_PCRS,
    VAIK_POLICY_REF,
    Attestation,
    Certification,
    HostKeyReport,
    KeyPolicy,
    KeyRef,
    WrappedKey,
)

__all__ = ["Attestation", "Connection", "HostKeysMissing", "PytssHostTpm"]

log = logging.getLogger(__name__)

_TPM_GENERATED_VALUE = b"\xffTCG"


class PytssHostTpm(KeyMigration, TpmStorage):
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

    # ------------------------------------------------------------------ PCRs

    def pcr_values(self, pcrs: Sequence[int] = AUTHKEY_PCRS) -> dict[int, bytes]:
        """Current sha256 PCR values."""
        return self._call(lambda: self._read_pcrs(pcrs), hot=True, retry=True)

    # ------------------------------------------------------------------ EK

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

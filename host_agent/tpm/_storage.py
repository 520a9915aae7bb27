"""Sealed data and NV indices of the host TPM adapter: ``seal``/``unseal``, the NV counters.

:class:`TpmStorage` holds what the adapter keeps in the TPM or under it, apart from keys: data
sealed to the SRK (optionally to PCR values, checked as the keys' PCR policies are), the
monotonic NV counters in the owner range (the store's rollback protection), and reading an NV
index whole (the EK certificates, read by the adapter's EK operations). It is a base class of
the adapter (above :class:`~host_agent.tpm._objects.TpmObjects`), not an object of its own; its
one piece of state, the NV indices' ESYS_TRs (``_nv_trs``), is set by ``PytssHostTpm.__init__``
and cleared with the connection. Kept apart because none of it touches the host or VM keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HC, TPM2_NT, TPM2_PT_NV, TPMA_NV
from tpm2_pytss.types import TPM2_HANDLE, TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC
from tpm2_pytss.utils import NoSuchIndex

from evidence import tpm2_policy as pure

from . import keys, policies
from ._connection import log
from ._objects import TpmObjects
from ._wire import SealedBlob, private_from_bytes, public_from_bytes
from .errors import TpmError
from .port import KeyPolicy

__all__ = ["TpmStorage"]

_NV_OWNER_FIRST, _NV_OWNER_LAST = 0x01800000, 0x01BFFFFF
_MAX_SEAL = 128


class TpmStorage(TpmObjects):
    """Sealing and NV counters of the host TPM adapter (module docstring)."""

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

    # ------------------------------------------------------------------ NV reads

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

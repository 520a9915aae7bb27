"""Migration of a vAIK by the host TPM adapter: ``duplicate`` and ``import_key``.

:class:`KeyMigration` holds the two TPM operations a vAIK migration runs: TPM2_Duplicate of a
vAIK towards a certified ExgKey's public area (the source host), and TPM2_Import of that
duplicate under this host's ExgKey (the target host). It is a base class of the adapter (above
:class:`~host_agent.tpm._hot.HotPath`, whose saved contexts and vAIK policy branches it uses),
not an object of its own. The vAIK's DUP branch and its known limit are in the adapter module
docstring ("vAIK design"); the migration protocol around these calls is
:mod:`host_agent.migration`.

A duplicate uses an inner wrapper (AES-128-CFB, TPM-generated key) and the outer seed to the
ExgKey; the imported key keeps its public area (same Name) and is stored wrapped under the ExgKey
(its :class:`WrappedKey` names that parent), so the migrated vAIK signs with the same public key.
"""

from __future__ import annotations

from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_DATA, TPM2B_ENCRYPTED_SECRET, TPM2B_PRIVATE

from . import policies
from ._hot import HotPath
from ._wire import public_from_bytes, sym_aes128cfb, unmarshal
from .port import DuplicationBlob, WrappedKey

__all__ = ["KeyMigration"]


class KeyMigration(HotPath):
    """Duplicating a vAIK and importing it (module docstring)."""

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

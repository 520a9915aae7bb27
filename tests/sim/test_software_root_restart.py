"""The software root survives agent restarts: each stop is an orderly TPM2_Shutdown.

Without it every stop after a use of a DA-protected key (the AIK, the AuthKey) counted one
dictionary-attack failure at the next start-up, and swtpm's defaults (3 tries, 1,000 s recovery)
locked the host out of certification (TPM_RC_LOCKOUT) after three restarts of the agent.
Real swtpm, real tpm2-pytss.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import (
    TPM2_ALG,
    TPM2_CAP,
    TPM2_PT,
    TPM2_RH,
    TPM2_ST,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_TK_HASHCHECK,
)

from host_agent.tpm.keys import aik_template
from host_agent.tpm.software_root import SoftwareRoot


@pytest.fixture
def root(tmp_path: Path) -> Iterator[SoftwareRoot]:
    r = SoftwareRoot(tmp_path / "root")
    r.start()
    try:
        yield r
    finally:
        r.stop()


def _lockout_counter(root: SoftwareRoot) -> int:
    with ESAPI(TCTILdr.parse(root.tcti)) as esys:
        _, data = esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        prop = data.data.tpmProperties.tpmProperty[0]
        assert prop.property == TPM2_PT.LOCKOUT_COUNTER
        return int(prop.value)


def _sign_with_da_protected_key(root: SoftwareRoot) -> None:
    """A password authorisation of a key without noDA, like every use of the AIK (whose
    template is restricted: an unrestricted twin signs an arbitrary digest)."""
    assert not int(aik_template().publicArea.objectAttributes) & int(TPMA_OBJECT.NODA)
    with ESAPI(TCTILdr.parse(root.tcti)) as esys:
        pub = TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256",
            objectAttributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
        )
        handle, *_ = esys.create_primary(None, pub)
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        esys.sign(handle, TPM2B_DIGEST(bytes(32)), TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), ticket)
        esys.flush_context(handle)


def test_software_root_restarts_count_no_dictionary_attack_failures(root: SoftwareRoot) -> None:
    assert _lockout_counter(root) == 0
    for _ in range(4):  # one more than swtpm's default maxTries
        _sign_with_da_protected_key(root)
        root.stop()
        root.start()
        assert _lockout_counter(root) == 0
    _sign_with_da_protected_key(root)  # TPM_RC_LOCKOUT here before the fix

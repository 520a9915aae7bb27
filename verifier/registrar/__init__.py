"""The fleet registrar (``vtpm-verify registrar``): admits hosts into the fleet.

Modules, from the pure core outwards:

- :mod:`~verifier.registrar.credential`: MakeCredential without a TPM (pure, mypy-strict).
- :mod:`~verifier.registrar.keys`: admission checks on the EK and AIK public areas.
- :mod:`~verifier.registrar.ekcert`: EK certificate chain validation against the EK CA bundle.
- :mod:`~verifier.registrar.ca`: the fleet CA (AIK and mTLS certificates) and policy key.
- :mod:`~verifier.registrar.messages`: the API-v1 wire messages and their strict parsers.
- :mod:`~verifier.registrar.store`: admitted hosts and pending challenges (SQLAlchemy).
- :mod:`~verifier.registrar.service`: the admission protocol; called in-process (embedded mode)
  or by :mod:`~verifier.registrar.server` (HTTPS).
- :mod:`~verifier.registrar.state`: the state directory (keys, config, bundle) and its init.
- :mod:`~verifier.registrar.embedded`: the service in the host agent's process (single host).
- :mod:`~verifier.registrar.errors`: the typed refusals.
"""

__all__: list[str] = []

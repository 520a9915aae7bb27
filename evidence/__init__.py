"""The pure core of vtpm-trust.

Bytes and values in, frozen dataclasses out, or a typed error from :mod:`evidence.errors`.
Imports only the standard library and ``cryptography``: no clock, randomness, sockets, files,
subprocesses or TPM library, so it runs on an air-gapped laptop.
"""

__all__: list[str] = []

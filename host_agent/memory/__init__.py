"""Memory integrity engine: page sources, Merkle tree, parallel hashing, dirty-page tracking.

Pure codecs (no I/O): :mod:`.merkle`, :mod:`.migstream`, :mod:`.saveimage`, :mod:`.elfdump`.
I/O: :mod:`.sources` (files, a live QEMU's memfd), :mod:`.hasher`, :mod:`.dirty`, :mod:`.cli`.
"""

__all__: list[str] = []

"""Linux IMA runtime measurement lists: parse, encode, replay PCR 10.

Theory of operation (protocols.md §6.2; sources: torvalds/linux ``security/integrity/ima/``
``ima_fs.c`` (``ima_measurements_show``, ``ima_ascii_measurements_show``), ``ima_template.c``
(built-in templates), ``ima_template_lib.c`` (field formats), ``ima_crypto.c``
(``ima_calc_field_array_hash_tfm``), ``ima_queue.c`` and ``ima_api.c`` (PCR extension,
``ima_add_violation``); keylime ``keylime/ima/ast.py`` for the verifier rules):

* An entry is ``pcr, template hash, template name, template data``; the template data is a list of
  fields whose layout the template names. Supported templates (``TEMPLATES``): ``ima`` = ``d|n``,
  ``ima-ng`` = ``d-ng|n-ng``, ``ima-sig`` = ``d-ng|n-ng|sig``, ``ima-buf`` = ``d-ng|n-ng|buf``.
* Field data as the kernel holds it: ``d`` is a raw 20-byte digest, ``d-ng`` is
  ``b"<algo>:\\0" + digest``, ``n``/``n-ng`` is the name plus a terminating NUL (spaces already
  replaced by ``_``), ``sig``/``buf`` are raw bytes, possibly empty.
* The template hash (what :attr:`ImaEntry.hash_input` returns) is ``H(for each field:
  u32le(len) + data)``; for ``ima`` there is no length prefix and ``n`` is zero-padded to 256 bytes.
* The default files log the SHA-1 template hash. Linux >= 5.8 extends each PCR bank with
  ``H_bank(hash input)`` (rule ``"5.8"``); older kernels extended every bank with the SHA-1 template
  hash zero-padded to the bank size (rule ``"pre-5.8"``).
* A violation is logged with an all-zero template hash; the PCR was extended with ``0xFF`` bytes
  (bank size since 5.8; before, 20 bytes zero-padded like every digest), and the template hash
  check is skipped for it.
* Seen on a real kernel (tests/vectors/ima): a bank whose hash the kernel could not compute when
  IMA started (Debian 6.1: ``CONFIG_CRYPTO_SHA512=m``, so sha384/sha512) gets the padded SHA-1
  template hash even under the 5.8 rule; ``replay_ima_pcr10(kernel_hashless_banks=…)`` models it.

Decisions:

* Templates we do not decode (``ima-ngv2``, ``ima-sigv2``, ``ima-modsig``, ``evm-sig`` and unknown
  names) are kept as entries with ``supported=False`` and no fields, so ``ima show`` can list them;
  any replay of a list holding one raises :class:`~evidence.errors.UnsupportedError` naming the
  entry. A list with such an entry never yields a PCR value.
* A truncated final entry sets ``truncated_tail`` and is dropped; replay covers the complete
  entries only. "Truncated" means the input ends inside an entry whose length fields read so far are
  within the kernel's limits and agree with each other; a length past those limits or inconsistent
  with the data present is a :class:`~evidence.errors.ParseError`. In ASCII, a last line without
  its newline is the truncated entry.
* Only the default ``ascii_runtime_measurements`` / ``binary_runtime_measurements`` files (SHA-1
  template hash) are handled; the per-bank ``_<algo>`` files of Linux >= 6.10 are not.
* Speed (issue 7): :func:`parse_ima_list` keeps the entries as columns (template data, d-ng and
  name fields, …), matched in bulk by one regular expression for the common entries (d-ng
  templates, a known digest algorithm, an empty third field in binary); any other entry goes
  through the general entry parser, and a column check that fails hands the whole input to it,
  so entries and errors are the general parser's. :func:`replay_ima_pcr10`, :func:`replay_ima`
  and :func:`signed_prefix` work on the columns; ``entries`` of :class:`RawImaList` and
  :class:`VerifiedImaList` are built only when read. A list built from entries takes the general
  path everywhere; ``tests/unit/test_ima_fastpath.py`` compares the two.

Layout: this module is the public face and holds no code; import from it. The parts, each of
which imports only the ones above it (never this module):

* :mod:`evidence._ima_model`: the constants, :class:`KernelRule`, :class:`ImaEntry`,
  :class:`RawImaList` and its columns.
* :mod:`evidence._ima_codec`: the general parser, entry by entry, and the encoders.
* :mod:`evidence._ima_fastpath`: :func:`parse_ima_list` and its column-wise fast paths.
* :mod:`evidence._ima_replay`: the PCR 10 replay and the verified list.
"""

from __future__ import annotations

# The "name as name" imports re-export private names that tests reach as ima._name.
from evidence._ima_codec import _parse_ascii as _parse_ascii
from evidence._ima_codec import _parse_binary as _parse_binary
from evidence._ima_codec import encode_ascii, encode_binary
from evidence._ima_fastpath import _parse_ascii_fast as _parse_ascii_fast
from evidence._ima_fastpath import _parse_binary_fast as _parse_binary_fast
from evidence._ima_fastpath import parse_ima_list
from evidence._ima_model import _BANK_SIZE as _BANK_SIZE
from evidence._ima_model import BANKS, IMA_PCR, TEMPLATES, ImaEntry, KernelRule, RawImaList
from evidence._ima_replay import (
    ImaReplay,
    VerifiedImaColumns,
    VerifiedImaEntry,
    VerifiedImaList,
    replay_ima,
    replay_ima_pcr10,
    signed_prefix,
)

__all__ = [
    "BANKS",
    "IMA_PCR",
    "TEMPLATES",
    "ImaEntry",
    "ImaReplay",
    "KernelRule",
    "RawImaList",
    "VerifiedImaColumns",
    "VerifiedImaEntry",
    "VerifiedImaList",
    "encode_ascii",
    "encode_binary",
    "parse_ima_list",
    "replay_ima",
    "replay_ima_pcr10",
    "signed_prefix",
]

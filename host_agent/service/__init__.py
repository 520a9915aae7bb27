"""The host agent's long-running side: the ``vtpm-host daemon`` and what it owns.

Modules (import them directly; this package re-exports nothing):

- ``daemon``: the daemon itself (host TPM, trusted store, the bridges' hooks server, the VM
  registry, the libvirt adapter when available, the control socket, signals) and the
  ``components`` extension point other services (attestation, enrollment) plug into;
- ``vm_registry``: VM UUID → its swtpm instance, bridge and adoption record, as the daemon sees
  them.
"""

__all__: list[str] = []

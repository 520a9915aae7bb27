"""VM lifecycle on libvirt: the hypervisor adapter, domain adoption, and the ``vm`` commands.

Modules (import them directly; this package re-exports nothing):

- ``domain_xml``: pure domain-XML transforms (adopt a domain, describe one, build one for an image);
- ``embedded``: prepares the embedded libvirt driver's root (qemu.conf, the ``libvirt-qemu`` user);
- ``libvirt_adapter``: the only module that touches libvirt objects: connection, event loop thread,
  typed lifecycle events, domain operations, ``HypervisorError``;
- ``adoption``: adopt / create / start / stop / list VMs (swtpm + bridge around QEMU);
- ``cli``: ``vtpm-host vm adopt|create|list|start|stop``.
"""

__all__: list[str] = []

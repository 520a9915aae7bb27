"""Per-VM vTPM plumbing: the control-channel codec, the QEMU↔swtpm bridge and its daemon link.

Modules (import them directly; this package re-exports nothing):

- ``ctrl_codec``: pure codec of swtpm's control channel and TPM data-channel framing;
- ``daemon_link``: pure codec of the bridge ↔ daemon local socket protocol;
- ``bridge``: the per-VM relay between QEMU and swtpm (vPCR reads, state-transfer hooks);
- ``hooks_server``: the daemon side of the link (routes hooks to callables, issues vPCR reads);
- ``cli``: ``vtpm-host vm pcrs``.
"""

__all__: list[str] = []

"""Per-VM vTPM plumbing: the control-channel codec, the QEMU↔swtpm bridge and its daemon link.

Modules (import them directly; this package re-exports nothing):

- ``ctrl_codec``: pure codec of swtpm's control channel and TPM data-channel framing (a facade
  over ``_ctrl_proto``, ``_ctrl_requests``, ``_ctrl_replies``, ``_ctrl_runstate``,
  ``_ctrl_framing``);
- ``daemon_link``: pure codec of the bridge ↔ daemon local socket protocol;
- ``bridge``: the per-VM relay between QEMU and swtpm (vPCR reads, state-transfer hooks), with
  ``bridge_relay`` (data relay and injection scheduler), ``bridge_hooks`` (state-blob hooks and
  vetoes), ``bridge_peers`` (daemon link and query server), ``bridge_cli`` (arguments) and the
  smaller ``bridge_errors``, ``bridge_link``, ``bridge_pcr``, ``bridge_state``;
- ``hooks_server``: the daemon side of the link (routes hooks to callables, issues vPCR reads);
- ``cli``: ``vtpm-host vm pcrs``.
"""

__all__: list[str] = []

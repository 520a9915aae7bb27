"""Re-export of :mod:`scripts.lab.netns` (the namespace pair lives there, shared with the demo)."""

from scripts.lab.netns import NetnsPair, probe_tcp, two_hosts

__all__ = ["NetnsPair", "probe_tcp", "two_hosts"]

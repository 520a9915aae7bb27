"""Two hosts on one machine, for the e2e tests and ``make demo-migration`` (issue 8).

- :mod:`scripts.lab.netns`: network namespaces joined by a veth pair;
- :mod:`scripts.lab.libvirtd_ns`: a real libvirtd inside each namespace host;
- :mod:`scripts.lab.fleet`: one registrar admitting two hosts (software-root TPM, store, mTLS
  identity each) and the fleet's approval of their platform state;
- :mod:`scripts.lab.hosts`: ``vtpm-host daemon`` (migration + attestation) inside a namespace
  host, the libvirt qemu hook that makes a plain ``virsh migrate`` move the vAIK, and
  ``host_pair`` (both namespace hosts with their libvirtds and the fleet's state bound in);
- :mod:`scripts.lab.guest`: the guest agent copied into a guest over SSH, and a stand-in for a
  QEMU asking a host for a quote through the VM's channel;
- :mod:`scripts.lab.procs`: processes found by command line (what a run left behind), a child
  stopped by its handle (SIGTERM, then SIGKILL); the demos use it too.

Product code never imports this package; ``tests/helpers/netns.py``, ``libvirtd_ns.py`` and
``tests/sim/test_migration_hosts.py`` re-export it, so the tests and the demo build the same lab.
"""

"""Two hosts on one machine, for the e2e tests and ``make demo-migration`` (issue 8).

- :mod:`scripts.lab.netns`: network namespaces joined by a veth pair;
- :mod:`scripts.lab.libvirtd_ns`: a real libvirtd inside each namespace host;
- :mod:`scripts.lab.fleet`: one registrar admitting two hosts (software-root TPM, store, mTLS
  identity each) and the fleet's approval of their platform state.

Product code never imports this package; ``tests/helpers/netns.py``, ``libvirtd_ns.py`` and
``tests/sim/test_migration_hosts.py`` re-export it, so the tests and the demo build the same lab.
"""

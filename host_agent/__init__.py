"""vtpm-host: the daemon and admin CLI that runs on every libvirt host."""

"""VM factory (kata's factory): VM templating, the pre-booted VM cache and VM identity.

- :mod:`~shim.factory.vmdir` — every VM's own id and directory, linked into its sandbox;
- :mod:`~shim.factory.key` — the VM shape a clone must share with its template, and its key;
- :mod:`~shim.factory.template` — the template on its tmpfs: build, check, destroy;
- :mod:`~shim.factory.warmup` — the template VM runs one container before it is saved;
- :mod:`~shim.factory.factory` — :class:`~shim.factory.factory.VmFactory`, the seam the sandbox
  boots through (cache → template clone → cold boot);
- :mod:`~shim.factory.cache_server` / :mod:`~shim.factory.cache_client` — ``kata-colo-vmcache``,
  the node daemon that keeps paused clones and hands them to shims;
- :mod:`~shim.factory.cli` — ``factory init|status|destroy`` (called by ``kata-colo-ctl``).

Importing this package imports nothing else (the shim's start/delete paths stay light).
"""

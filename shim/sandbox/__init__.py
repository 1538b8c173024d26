"""One pod's VM: :class:`~shim.sandbox.sandbox.Sandbox` (VM + resources, the handle shared with
the management server), :class:`~shim.sandbox.containers.ContainerOps` (the product Backend:
container and process operations through the guest agent), :mod:`~shim.sandbox.vmconfig`
(configuration → VmConfig) and :mod:`~shim.sandbox.oci_guest` (host OCI spec → guest spec)."""

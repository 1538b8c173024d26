"""``kata-colo-device-plugin``: a kubelet device plugin (v1beta1) exposing host PCI functions bound
to vfio-pci — NVMe controllers and ENI NICs — as extended resources (``kata-colo.io/nvme``,
``kata-colo.io/eni``) for kata-colo pods. :mod:`.discovery` scans sysfs, :mod:`.cdi` writes the
CDI specs the shim resolves, :mod:`.plugin` is the gRPC DevicePlugin service, :mod:`.registrar`
registers with kubelet and again whenever kubelet.sock is recreated, :mod:`.main` the CLI."""

"""VFIO passthrough on the host: sysfs groups and driver binding (:mod:`.sysfs`), PCI NICs of
the pod network namespace passed through as kata physical endpoints (:mod:`.physical`)."""

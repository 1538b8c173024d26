"""Block storage of containers: block rootfs from cached layer images (:mod:`.cache`,
:mod:`.mkimage`, :mod:`.layers`), scratch disks (:mod:`.scratch`), data disks and VFIO requests
(:mod:`.requests`), host-wide device claims (:mod:`.claims`), the per-container resource
(:mod:`.resource`), its plan (:mod:`.plan`) and the provider ContainerOps uses (:mod:`.provider`)."""

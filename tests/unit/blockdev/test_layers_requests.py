"""containerd rootfs mounts → block rootfs sources; OCI spec → data disks and VFIO requests."""
import base64
import json
import os

import pytest

from common.errors import InvalidArgument, NotFound
from shim.backend import Mount
from shim.resources.blockdev import layers, requests


def test_overlay_layers_top_first_and_upper_content(tmp_path):
    lowers = [tmp_path / n for n in ("l2", "l1")]
    for d in lowers:
        d.mkdir()
    upper, work = tmp_path / "up", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = Mount("overlay", "overlay", options=(f"lowerdir={lowers[0]}:{lowers[1]}", f"upperdir={upper}",
                                             f"workdir={work}", "index=off"))
    src = layers.classify([m])
    assert src == layers.Layered((str(lowers[0]), str(lowers[1])), str(upper), False, False)
    (upper / "changed").write_text("x")
    assert layers.classify([m]).upper_has_content


def test_bind_views_and_devmapper_and_unsupported(tmp_path):
    assert layers.classify([Mount("bind", str(tmp_path), options=("ro", "rbind"))]) == \
        layers.Layered((str(tmp_path),), readonly=True)
    assert layers.classify([Mount("bind", str(tmp_path), options=("rw", "rbind"))]) == \
        layers.Layered((), str(tmp_path), False)
    loop = next((f"/dev/{n}" for n in ("loop0", "loop1") if os.path.exists(f"/dev/{n}")), None)
    if loop:
        assert layers.classify([Mount("ext4", loop, options=("rw",))]) == layers.BlockSnapshot(loop, "ext4", ("rw",))
    assert isinstance(layers.classify([Mount("ext4", str(tmp_path))]), layers.Unsupported)
    assert isinstance(layers.classify([]), layers.Unsupported)
    assert isinstance(layers.classify([Mount("tmpfs", "tmpfs")]), layers.Unsupported)
    assert isinstance(layers.classify([Mount("overlay", "overlay", options=("lowerdir=/nonexistent",))]),
                      layers.Unsupported)
    two = [Mount("bind", str(tmp_path)), Mount("bind", str(tmp_path))]
    assert "2 rootfs mounts" in layers.classify(two).reason


def _dv(root, volume, device, fstype="ext4"):
    d = root / base64.urlsafe_b64encode(str(volume).encode()).decode()
    d.mkdir(parents=True)
    (d / "mountInfo.json").write_text(json.dumps({"volume_type": "block", "device": str(device), "fstype": fstype,
                                                  "metadata": {}, "options": ["noatime"]}))


def test_direct_volume_and_vfio_and_nvme_mounts(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 4096)
    vol = tmp_path / "vol"
    vol.mkdir()
    dv = tmp_path / "dv"
    _dv(dv, vol, img)
    spec = {"mounts": [{"destination": "/data", "type": "bind", "source": str(vol), "options": ["rbind", "ro"]},
                       {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts"}],
            "linux": {"devices": [{"path": "/dev/vfio/12", "type": "c", "major": 240, "minor": 0},
                                  {"path": "/dev/vfio/vfio", "type": "c"}]},
            "annotations": {requests.ANNOTATION_NVME_MOUNTS: "/scratch:xfs,/logs"}}
    req = requests.parse(spec, direct_volumes_dir=str(dv), cdi_spec_dirs=())
    assert req.disks == [requests.DiskRequest(str(img), "mount", "/data", "ext4", ("ro", "noatime"), True)]
    assert [v.host_path for v in req.vfio] == ["/dev/vfio/12"]
    assert req.nvme_mounts == [requests.NvmeMount("/scratch", "xfs"), requests.NvmeMount("/logs", "ext4")]


def test_bad_requests_are_clear_errors(tmp_path):
    dv = tmp_path / "dv"
    vol = tmp_path / "vol"
    vol.mkdir()
    _dv(dv, vol, tmp_path / "missing.img")
    spec = {"mounts": [{"destination": "/d", "type": "bind", "source": str(vol)}]}
    with pytest.raises(NotFound, match="not a block device or image file"):
        requests.parse(spec, direct_volumes_dir=str(dv), cdi_spec_dirs=())
    with pytest.raises(InvalidArgument, match="filesystem"):
        requests.parse_nvme_mounts("/x:ntfs")
    with pytest.raises(NotFound, match="no host block device"):
        requests.parse({"linux": {"devices": [{"path": "/dev/nope", "type": "b", "major": 4095, "minor": 77}]}},
                       cdi_spec_dirs=())


def test_cdi_annotation_resolves_through_a_cdi_spec(tmp_path):
    (tmp_path / "kata-colo.json").write_text(json.dumps({
        "cdiVersion": "0.6.0", "kind": "kata-colo.io/nvme",
        "devices": [{"name": "0000-3b-00.0", "containerEdits": {"deviceNodes": [{"path": "/dev/vfio/46"}]}}]}))
    spec = {"annotations": {"cdi.k8s.io/kata-colo": "kata-colo.io/nvme=0000-3b-00.0"}}
    req = requests.parse(spec, cdi_spec_dirs=(str(tmp_path),))
    assert [v.host_path for v in req.vfio] == ["/dev/vfio/46"]
    with pytest.raises(NotFound, match="in no CDI spec"):
        requests.parse({"annotations": {"cdi.k8s.io/x": "kata-colo.io/nvme=other"}}, cdi_spec_dirs=(str(tmp_path),))

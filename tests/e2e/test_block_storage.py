"""End to end: block rootfs and NVMe data disks through ctr and CRI (real containerd 1.6 + the
installed shim + QEMU/TCG), with a private layer cache and scratch directory.

The guest image is ``$KATA_COLO_IMAGE_DIR/current`` (default /var/lib/kata-colo/images/current);
``pcie_root_ports = 6`` lets CRI's app containers (after the pause container's boot) hot-plug their
rootfs and data disks.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri.client import CriClient, container_config, pod_config
from tests.support.containerd import (
    CRI_NAMESPACE,
    IMAGE,
    RUNTIME,
    Containerd,
    product_shim_dir,
    start_containerd,
    stop_containerd,
)

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]

IMAGES = Path(os.environ.get("KATA_COLO_IMAGE_DIR", "/var/lib/kata-colo/images")) / "current"
TOOLS_IMAGE = "docker.io/library/kata-colo-tools:iperf3"
PAUSE_IMAGE = "localhost/kata-colo/pause:3.6"
STATE_ROOT = Path("/run/kata-colo/sbs")


def _config(d: Path, *, block: bool = True) -> Path:
    path = d / ("config.toml" if block else "config-9p.toml")
    path.write_text(f"""
[hypervisor.qemu]
kernel = "{IMAGES / 'vmlinux'}"
initrd = "{IMAGES / 'initramfs.cpio'}"
pcie_root_ports = 6
disable_block_device_use = {str(not block).lower()}

[storage]
layer_cache_dir = "{d / 'layers'}"
layer_cache_max_mib = 64
scratch_dir = "{d / 'scratch'}"
scratch_disk_mib = 256
direct_volumes_dir = "{d / 'direct-volumes'}"
claims_dir = "{d / 'claims'}"
""")
    return path


class Env:
    def __init__(self, c: Containerd, d: Path) -> None:
        self.c, self.dir = c, d
        self.config_9p = _config(d, block=False)

    @property
    def cache(self) -> Path:
        return self.dir / "layers"

    @property
    def scratch(self) -> Path:
        return self.dir / "scratch"

    def cache_meta(self) -> dict[str, dict]:
        return {p.stem: json.loads(p.read_text()) for p in self.cache.glob("*.json")}

    def direct_volume(self, volume: Path, device: Path) -> None:
        name = base64.urlsafe_b64encode(str(volume).encode()).decode()
        info = self.dir / "direct-volumes" / name
        info.mkdir(parents=True, exist_ok=True)
        (info / "mountInfo.json").write_text(json.dumps({"volume_type": "block", "device": str(device),
                                                         "fstype": "ext4", "metadata": {}, "options": []}))


def _loops() -> set[str]:
    return set(subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines())


def assert_nothing_left(env: Env, sandbox_id: str, loops_before: set[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        mounts = [ln for ln in Path("/proc/self/mounts").read_text().splitlines()
                  if sandbox_id in ln or str(env.dir) in ln]
        left = {"state": (STATE_ROOT / sandbox_id).exists(), "mounts": mounts,
                "scratch": sorted(str(p) for p in env.scratch.glob(f"{sandbox_id}/*")),
                "scratch dir": (env.scratch / sandbox_id).exists(), "loops": sorted(_loops() - loops_before),
                "claims": sorted(os.listdir(env.dir / "claims")) if (env.dir / "claims").is_dir() else []}
        if not any(left.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind for {sandbox_id}: {left}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    if shutil.which("containerd") is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's containerd")
    if not (IMAGES / "manifest.json").exists():
        pytest.skip(f"guest image not built ({IMAGES})")
    if shutil.which("mkfs.erofs") is None:
        pytest.skip("erofs-utils not installed (make setup)")
    d = Path(tempfile.mkdtemp(prefix="kc-blk-", dir="/var/tmp"))
    config = _config(d)
    shim_dir = product_shim_dir()
    old = os.environ.get("KATA_COLO_CONFIG")
    os.environ["KATA_COLO_CONFIG"] = str(config)
    try:
        c = start_containerd([shim_dir])
    finally:
        if old is None:
            os.environ.pop("KATA_COLO_CONFIG", None)
        else:
            os.environ["KATA_COLO_CONFIG"] = old
    try:
        import make_tool_image

        c.import_busybox()
        tools = d / "tools.tar"
        make_tool_image.build(str(tools), TOOLS_IMAGE, ["/usr/bin/iperf3"])
        c.ctr("image", "import", str(tools))
        c.namespace = CRI_NAMESPACE
        c.import_busybox()
        c.namespace = "default"
        yield Env(c, d)
    finally:
        stop_containerd(c)
        shutil.rmtree(shim_dir, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)


def test_ctr_block_rootfs_is_not_9p_and_leaves_nothing(env):
    before = _loops()
    res = env.c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "kc-blk-root", "sh", "-c",
                    "grep -E '^[^ ]+ / ' /proc/mounts; stat -f -c %t /; "
                    "dd if=/dev/zero of=/big bs=1M count=8 2>/dev/null && sync && ls -la /big")
    out = res.stdout.decode()
    root = out.splitlines()[0].split()
    assert root[2] == "overlay" and "9p" not in out.splitlines()[0], out
    assert "lowerdir=/run/kata-containers/block/kc-blk-root/lower/0" in root[3], out
    assert out.splitlines()[1] == "794c7630", out  # OVERLAYFS_SUPER_MAGIC (9p: 1021997)
    assert "8388608" in out, out
    metas = env.cache_meta()
    assert metas and all(m["format"] == "erofs" for m in metas.values()), metas  # the layer's disk image
    assert_nothing_left(env, "kc-blk-root", before)


def test_iperf3_server_works_without_tmpdir_on_block_rootfs(env):
    script = "iperf3 -s -1 -D && sleep 1 && iperf3 -c 127.0.0.1 -t 1 -f m"
    res = env.c.ctr("run", "--rm", "--runtime", RUNTIME, TOOLS_IMAGE, "kc-blk-iperf", "sh", "-c", script,
                    check=False)
    out = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 0 and "receiver" in out, out
    # the same on the 9p rootfs fails (a file unlinked while open cannot be ftruncated there)
    res = env.c.ctr("run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", str(env.config_9p),
                    TOOLS_IMAGE, "kc-blk-iperf9p", "sh", "-c",
                    "grep -E '^[^ ]+ / ' /proc/mounts; " + script, check=False)
    out9p = res.stdout.decode() + res.stderr.decode()
    assert " 9p " in out9p.splitlines()[0], out9p
    assert res.returncode != 0 and "receiver" not in out9p, out9p


def test_nvme_data_disk_survives_a_pod_restart_ctr(env):
    image = env.dir / "data-ctr.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    volume = env.dir / "vol-ctr"
    volume.mkdir()
    env.direct_volume(volume, image)
    mount = f"type=bind,src={volume},dst=/data,options=rbind:rw"
    before = _loops()
    out = env.c.ctr("run", "--rm", "--runtime", RUNTIME, "--mount", mount, IMAGE, "kc-blk-nvme1", "sh", "-c",
                    "grep ' /data ' /proc/mounts; echo kept-$(hostname) > /data/marker; sync").stdout.decode()
    assert re.match(r"/dev/nvme\d+n1 /data ext4 ", out), out
    assert_nothing_left(env, "kc-blk-nvme1", before)
    out = env.c.ctr("run", "--rm", "--runtime", RUNTIME, "--mount", mount, IMAGE, "kc-blk-nvme2",
                    "cat", "/data/marker").stdout.decode()
    assert out.strip() == "kept-kc-blk-nvme1", out
    assert_nothing_left(env, "kc-blk-nvme2", before)


def test_a_data_disk_cannot_go_to_two_sandboxes(env):
    image = env.dir / "data-busy.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    volume = env.dir / "vol-busy"
    volume.mkdir()
    env.direct_volume(volume, image)
    mount = f"type=bind,src={volume},dst=/data,options=rbind:rw"
    env.c.ctr("run", "-d", "--runtime", RUNTIME, "--mount", mount, IMAGE, "kc-blk-owner", "sleep", "600")
    try:
        res = env.c.ctr("run", "--rm", "--runtime", RUNTIME, "--mount", mount, IMAGE, "kc-blk-thief", "true",
                        check=False)
        err = res.stderr.decode()
        assert res.returncode != 0 and "already given to sandbox kc-blk-owner" in err, err
        assert not (STATE_ROOT / "kc-blk-thief").exists()
    finally:
        env.c.ctr("task", "kill", "-s", "SIGKILL", "kc-blk-owner", check=False)
        deadline = time.monotonic() + 30
        while "RUNNING" in env.c.ctr("task", "ls").stdout.decode() and time.monotonic() < deadline:
            time.sleep(0.3)
        env.c.ctr("task", "rm", "-f", "kc-blk-owner", check=False)
        env.c.ctr("container", "rm", "kc-blk-owner", check=False)
        env.c.ctr("container", "rm", "kc-blk-thief", check=False)
    assert_nothing_left(env, "kc-blk-owner", set())


def _cri(c: Containerd, fn):
    async def go():
        async with CriClient(c.address) as client:
            return await fn(client)
    return asyncio.run(go())


async def _pod_with_disk(client: CriClient, env: Env, name: str, volume: Path, first: str,
                         made: list[str]) -> tuple[str, list[str]]:
    deadline = time.monotonic() + 20
    while await client.image_status(IMAGE) is None or await client.image_status(PAUSE_IMAGE) is None:
        assert time.monotonic() < deadline, "CRI does not see the images"
        await asyncio.sleep(0.2)
    config = pod_config(name, "kc-blk", uid=f"{name}-uid", log_directory=str(env.dir / "logs" / name))
    pod = await client.run_pod_sandbox(config, runtime_handler="kata-colo")
    made.append(pod)  # removed by the test even when a later step fails
    ids = []
    for i, script in enumerate([first, "sleep 600"]):
        cfg = container_config(f"c{i}", IMAGE, command=["sh", "-c", script], log_path=f"c{i}.log",
                               mounts=[(str(volume), "/data")] if i == 0 else ())
        cid = await client.create_container(pod, cfg, sandbox_config=config)
        await client.start_container(cid)
        ids.append(cid)
    return pod, ids


def test_cri_hotplugged_block_rootfs_cache_reuse_and_nvme_restart(env):
    c = env.c
    c.namespace = CRI_NAMESPACE
    image = env.dir / "data-cri.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    volume = env.dir / "vol-cri"
    volume.mkdir()
    env.direct_volume(volume, image)
    before = _loops()
    made: list[str] = []
    try:
        async def first(client: CriClient):
            pod, ids = await _pod_with_disk(client, env, "kc-blk-pod1", volume,
                                            "echo from-pod1 > /data/marker && sync && sleep 600", made)
            rc, out, err = await client.exec_sync(ids[0], ["sh", "-c", "for i in $(seq 50); do "
                                                   "[ -s /data/marker ] && break; sleep 0.2; done; "
                                                   "grep -E ' / | /data ' /proc/mounts; cat /data/marker"], 60)
            rc2, out2, _ = await client.exec_sync(ids[1], ["sh", "-c", "grep -E '^[^ ]+ / ' /proc/mounts"], 60)
            await client.stop_pod_sandbox(pod)
            await client.remove_pod_sandbox(pod)
            return pod, rc, out.decode() + err.decode(), rc2, out2.decode()

        pod1, rc, out, rc2, out2 = _cri(c, first)
        assert rc == 0, out
        assert re.search(r"^overlay / overlay .*lowerdir=/run/kata-containers/block/", out, re.M), out
        assert re.search(r"^/dev/nvme\d+n1 /data ext4 ", out, re.M), out
        assert out.strip().endswith("from-pod1"), out
        assert rc2 == 0 and out2.startswith("overlay / overlay"), out2
        metas = env.cache_meta()
        busybox = [m for m in metas.values() if m["hits"] >= 1]
        assert busybox, metas  # the second busybox container leased the image the first one built
        saved = sum(m["build_seconds"] for m in busybox)
        print(f"layer cache: {len(metas)} images, {sum(m['hits'] for m in metas.values())} hits, "
              f"build time saved per hit {saved:.2f}s")
        assert_nothing_left(env, pod1, before)

        async def second(client: CriClient):
            pod, ids = await _pod_with_disk(client, env, "kc-blk-pod2", volume, "sleep 600", made)
            rc, out, err = await client.exec_sync(ids[0], ["cat", "/data/marker"], 60)
            await client.stop_pod_sandbox(pod)
            await client.remove_pod_sandbox(pod)
            return pod, rc, out.decode() + err.decode()

        pod2, rc, out = _cri(c, second)
        assert rc == 0 and out.strip() == "from-pod1", out
        assert_nothing_left(env, pod2, before)
        total = sum(p.stat().st_size for p in env.cache.glob("*.erofs"))
        assert total <= 64 << 20, total
    finally:
        async def cleanup(client: CriClient) -> None:
            for pod in made:
                with contextlib.suppress(Exception):
                    await client.stop_pod_sandbox(pod)
                    await client.remove_pod_sandbox(pod)

        _cri(c, cleanup)
        c.namespace = "default"

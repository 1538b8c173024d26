"""Helpers of the Cloud Hypervisor driver tests: the fake VMM (``fake_clh.py``, exec'd in place of
the binary) with its request journal and failure script, the upstream API schema, VM configs and
real tap (or pipe) fds for ``vm.add-net``. The fixtures are in conftest.py."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from hypervisor.base import VmConfig
from hypervisor.clh.options import ClhOptions

HERE = Path(__file__).resolve().parent
FAKE_CLH = str(HERE / "fake_clh.py")
SCHEMA = json.loads((HERE / "schema" / "cloud-hypervisor-api-0.3.0.json").read_text())
TUN = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100


def schema_validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator of ``$defs[name]`` of the upstream schema."""
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": SCHEMA["$defs"]})


def request_validator(endpoint: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**SCHEMA["x-paths"][endpoint]["request"], "$defs": SCHEMA["$defs"]})


@dataclass
class FakeVmm:
    """The test's side of the fake VMM: where it journals, and the failure script it reads."""

    journal_path: Path
    script_path: Path

    def entries(self) -> list[dict[str, Any]]:
        if not self.journal_path.exists():
            return []
        return [json.loads(line) for line in self.journal_path.read_text().splitlines() if line]

    def requests(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if "endpoint" in e]

    def calls(self) -> list[str]:
        return [e["endpoint"] for e in self.requests()]

    def last(self, endpoint: str) -> dict[str, Any]:
        return [e for e in self.requests() if e["endpoint"] == endpoint][-1]

    def starts(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if "argv" in e]

    def violations(self) -> list[str]:
        return [f"{e.get('endpoint')}: {v}" for e in self.requests() for v in e["violations"]]

    def script(self, actions: dict[str, list[Any]]) -> None:
        """Inject failures, e.g. ``{"vm.boot": ["exit"], "vm.resize": [{"status": 429}]}``."""
        self.script_path.write_text(json.dumps(actions))

    def reset_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()


def make_cfg(tmp_path: Path, **kw: Any) -> VmConfig:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF fake kernel")
    initrd = tmp_path / "initramfs.cpio"
    initrd.write_bytes(b"070701 fake initramfs")
    base: dict[str, Any] = dict(vm_id="clh-test", state_dir=str(tmp_path / "vm"), kernel=str(kernel),
                                initrd=str(initrd), hypervisor_path=FAKE_CLH, vcpus=2, max_vcpus=4,
                                memory_mib=512, max_memory_mib=1024, agent_channel="hybrid-vsock",
                                options=ClhOptions())
    base.update(kw)
    return VmConfig(**base)


def tap_available() -> bool:
    try:
        os.close(os.open(TUN, os.O_RDWR))
        return True
    except OSError:
        return False


def open_queue_fds(name: str, queues: int) -> list[int]:
    """``queues`` fds of a real, non-persistent tap (gone when the fds close), or pipe read ends
    where /dev/net/tun cannot be opened (not root)."""
    if not tap_available():
        fds = []
        for _ in range(queues):
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
        return fds
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    req = struct.pack("16sH22x", name.encode(), flags)
    fds = []
    try:
        for _ in range(queues):
            fd = os.open(TUN, os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, req)
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds

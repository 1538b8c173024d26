"""``factory init|status|destroy`` (kata-colo-ctl's factory command) without a VM: exit codes,
kata's messages, JSON output, a template that is there (made with the hypervisor double)."""
from __future__ import annotations

import io
import json
import os

import pytest

from shim.factory import cli, vmdir
from shim.factory import factory as factorymod
from shim.factory.template import Template
from tests.unit.factory.fakehv import FakeHv


def config(tmp_path, enabled: bool = True, cache: int = 0) -> str:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    p = tmp_path / "c.toml"
    p.write_text(f"""
[hypervisor.qemu]
kernel = "{kernel}"
initrd = ""
[factory]
enable_template = {str(enabled).lower()}
template_path = "{tmp_path / 'vm' / 'template'}"
vm_cache_number = {cache}
vm_cache_endpoint = "{tmp_path / 'none.sock'}"
""")
    return str(p)


async def call(action: str, path: str, **kw) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = await cli.run_async(action, path, out=out, err=err, **kw)
    return rc, out.getvalue(), err.getvalue()


async def test_usage_and_configuration_errors(tmp_path):
    assert (await call("bogus", config(tmp_path)))[0] == 2
    rc, _, err = await call("init", config(tmp_path, enabled=False))
    assert rc == 2 and "enable_template is off" in err
    rc, _, err = await call("status", str(tmp_path / "missing.toml"))
    assert rc == 2 and "does not exist" in err


async def test_status_and_destroy_with_nothing_there(tmp_path):
    path = config(tmp_path, cache=1)
    rc, out, _ = await call("status", path)
    assert rc == 0 and "vm factory is off" in out and "VM cache server not running" in out
    rc, out, _ = await call("status", path, as_json=True)
    doc = json.loads(out)
    assert doc["enabled"] and doc["template"]["template"] is None and doc["cache"]["running"] is False
    rc, out, _ = await call("destroy", path)
    assert rc == 0 and out.strip() == "vm factory destroyed"
    assert (await call("status", config(tmp_path, enabled=False)))[1].startswith("vm factory is not enabled")


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
async def test_status_shows_a_template_and_destroy_removes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(vmdir, "VM_ROOT", tmp_path / "vm")
    path = config(tmp_path)
    from shim import config as cfgmod

    cfg = cfgmod.load(path)

    async def ready(hv, cfg, timeout):
        return None

    t = Template(cfg.factory.template_path)
    info = await t.build(factorymod.node_vm_config(cfg), "qemu", boot_timeout=5, ready=ready,
                         hypervisor_factory=lambda name: FakeHv([]))
    try:
        rc, out, _ = await call("status", path)
        assert rc == 0 and "vm factory is on" in out and info.key in out and "clones mapping the template: 0" in out
        rc, out, _ = await call("destroy", path)
        assert rc == 0 and not t.path.exists()
    finally:
        t._unmount()


def test_kata_colo_ctl_factory_runs_the_factory_cli(tmp_path, capsys):
    from ctl.__main__ import main as ctl_main

    path = config(tmp_path, cache=1)
    assert ctl_main(["factory", "status", "--json", "--config", path]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["enabled"] and doc["cache"]["running"] is False
    assert ctl_main(["factory", "init", "--config", config(tmp_path, enabled=False)]) == 2
    assert "enable_template is off" in capsys.readouterr().err

from pathlib import Path

import pytest

from common.errors import ConfigError, InvalidArgument
from shim import config

REPO = Path(__file__).resolve().parents[3]


def test_packaged_defaults_parse_and_validate():
    cfg = config.load(str(REPO / "shim" / "defaults" / "configuration.toml"))
    assert cfg.runtime.hypervisor == "qemu"
    assert cfg.hypervisor.options.accel == "auto"
    assert cfg.hypervisor.binary == "/usr/bin/qemu-system-x86_64"
    assert cfg.hypervisor.default_memory == 512
    assert set(cfg.colo.priorities) == {"high", "low"}
    assert cfg.colo.priorities["low"]["cpu_shares"] == 2


def test_values_override_defaults():
    cfg = config.parse('[hypervisor.qemu]\ndefault_vcpus = 4\naccel = "tcg"\n[agent.kata]\ndial_timeout = 5\n')
    assert cfg.hypervisor.default_vcpus == 4
    assert cfg.hypervisor.options.accel == "tcg"
    assert cfg.agent.dial_timeout == 5.0


def test_driver_keys_go_to_the_driver_options():
    cfg = config.parse('[hypervisor.qemu]\npath = "/opt/qemu"\npcie_root_ports = 2\nmachine_type = "q35"\n')
    assert cfg.hypervisor.binary == "/opt/qemu"
    assert (cfg.hypervisor.options.pcie_root_ports, cfg.hypervisor.options.machine_type) == (2, "q35")


def test_vsock_transport_needs_vhost_vsock(tmp_path):
    from hypervisor import host

    text = "[agent.kata]\ntransport = 'vsock'\n"
    with pytest.raises(ConfigError, match="vhost-vsock"):
        config.parse(text, host_paths=host.HostPaths(str(tmp_path)))
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "vhost-vsock").write_text("")
    assert config.parse(text, host_paths=host.HostPaths(str(tmp_path))).agent.transport == "vsock"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[hypervisor.qemu]\naccel = 'xen'\n", "accel"),
        ("[hypervisor.qemu]\ndefault_vcpus = 0\n", "default_vcpus"),
        ("[hypervisor.qemu]\ndefault_vcpus = '2'\n", "wrong type"),
        ("[hypervisor.qemu]\nbogus = 1\n", "unknown key"),
        ("[hypervisor.firecracker]\n", "unknown hypervisor section [hypervisor.firecracker]"),
        ("[runtime]\nhypervisor = 'firecracker'\n", "runtime.hypervisor must be one of"),
        ("[runtime]\nstate_root = '/x'\n", "unknown key runtime.state_root"),
        ("[colo]\nenabled = true\n", "unknown key colo.enabled"),
        ("[agent.kata]\ntransport = 'hybrid-vsock'\n", "Cloud Hypervisor"),
        ("[hypervisor.qemu]\npcie_root_ports = 1\nmachine_type = 'pc'\n", "q35"),
        ("[nonsense]\n", "unknown section"),
        ("[hypervisor.qemu\n", "invalid configuration"),
        ("[hypervisor.qemu]\nkernel_params = 'a;reboot'\n", "kernel_params"),
        ("[colo]\ncgroup_root = '../etc'\n", "cgroup_root"),
        ("[colo.priorities.HIGH]\ncpu_shares = 1\n", "priority name"),
        ("[agent.kata]\ntransport = 'carrier-pigeon'\n", "transport"),
    ],
)
def test_invalid_config_is_a_clear_config_error(text, fragment):
    with pytest.raises(ConfigError) as exc:
        config.parse(text)
    assert fragment in str(exc.value)
    assert isinstance(exc.value, InvalidArgument)


def test_path_resolution_order(tmp_path, monkeypatch):
    a = tmp_path / "a.toml"
    a.write_text("[hypervisor.qemu]\ndefault_memory = 256\n")
    b = tmp_path / "b.toml"
    b.write_text("[hypervisor.qemu]\ndefault_memory = 1024\n")
    monkeypatch.setenv(config.ENV_PATH, str(b))
    assert config.load().hypervisor.default_memory == 1024
    assert config.load(str(a)).hypervisor.default_memory == 256
    monkeypatch.setenv(config.ENV_PATH, str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        config.load()


def test_annotations_allowed_and_rejected():
    cfg = config.parse("")
    prefix = config.ANNOTATION_HV_PREFIX
    out = config.apply_annotations(cfg, {prefix + "default_vcpus": "3", prefix + "default_memory": "1024",
                                         "unrelated": "x"})
    assert (out.hypervisor.default_vcpus, out.hypervisor.default_memory) == (3, 1024)
    with pytest.raises(ConfigError, match="not an integer"):
        config.apply_annotations(cfg, {prefix + "default_vcpus": "two"})
    with pytest.raises(ConfigError, match="not enabled"):
        config.apply_annotations(cfg, {prefix + "path": "/bin/sh"})
    with pytest.raises(ConfigError, match="annotations rejected"):
        config.apply_annotations(cfg, {prefix + "default_memory": "16"})
    ninep = config.apply_annotations(cfg, {prefix + "disable_block_device_use": "true"})
    assert ninep.hypervisor.disable_block_device_use is True
    with pytest.raises(ConfigError, match="true or false"):
        config.apply_annotations(cfg, {prefix + "disable_block_device_use": "yes"})
    locked = config.parse("[hypervisor.qemu]\nenable_annotations = []\n")
    with pytest.raises(ConfigError, match="not enabled"):
        config.apply_annotations(locked, {prefix + "default_vcpus": "2"})

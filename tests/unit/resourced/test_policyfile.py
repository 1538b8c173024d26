"""The policy file: the shipped one loads; every kind of bad input stops the daemon with the
file, the line and the reason (and the CLI exits 2 with that message)."""
from __future__ import annotations

from pathlib import Path

import pytest

from resourced import daemon
from resourced.cli import main
from resourced.errors import PolicyError
from shim.config import ColoConfig

REPO = Path(__file__).resolve().parents[3]
SHIPPED = REPO / "deploy" / "resourced.toml"


def load(text: str):
    return daemon.load(text, "/etc/kata-colo/resourced.toml", ColoConfig())


def test_shipped_policy_loads_with_the_documented_defaults():
    cfg = daemon.load(SHIPPED.read_text(), str(SHIPPED), ColoConfig())
    assert cfg.interval_ms == 200 and cfg.listen == "127.0.0.1:9301"
    cpu = cfg.policies["cpu"].config  # type: ignore[attr-defined]
    assert cpu.policy == "cpuset" and cpu.threshold_percent == 65 and cpu.min_cpus == 1
    assert not cpu.burst.enabled and not cpu.evict.enabled
    assert cfg.tiers.offline[0] == "kata-colo" and "kubepods/besteffort" in cfg.tiers.offline
    assert "kubepods/burstable" in cfg.tiers.online


def test_empty_file_is_all_defaults():
    cfg = load("")
    assert cfg.policies["cpu"].config.enabled  # type: ignore[attr-defined]


@pytest.mark.parametrize("text, line, needle", [
    ("[cpu]\nthreshold_percent = 150\n", 2, "cpu.threshold_percent: must be within 1..100"),
    ("[daemon]\n\ninterval_ms = 'fast'\n", 3, "daemon.interval_ms: must be a number"),
    ("[cpu]\npolicy = \"cpusets\"\n", 2, "must be one of"),
    ("[cpu]\nenabled = true\n[cpu.evict]\nenabled = 1\n", 4, "cpu.evict.enabled: must be true or false"),
    ("[cpu]\nthreshold = 50\n", 2, "cpu.threshold: unknown key"),
    ("[memroy]\nx = 1\n", 1, "memroy: unknown key"),
    ("[cpu\npolicy = 1\n", 1, "TOML syntax"),
    ("[cpu]\npolicy = \n", 2, "TOML syntax"),
    ("[tiers]\nonline = [\"a\"]\noffline = [\"a\"]\n", 3, "listed as both online and offline"),
    ("[tiers]\nonline = [\"../x\"]\n", 2, "bad cgroup path"),
    ("[tiers]\nonline = \"kubepods\"\n", 2, "must be a list of strings"),
    ("[daemon]\nlisten = \"localhost\"\n", 2, "host:port"),
    ("[cpu.burst]\npercent = -5\n", 2, "cpu.burst.percent"),
    ("cpu = 3\n", 1, "cpu: must be a table"),
])
def test_errors_name_file_line_reason(text, line, needle):
    with pytest.raises(PolicyError) as info:
        load(text)
    err = info.value
    assert err.file == "/etc/kata-colo/resourced.toml"
    assert err.line == line, str(err)
    assert needle in str(err)
    assert str(err).startswith(f"/etc/kata-colo/resourced.toml:{line}: ")


def test_cli_exit_2_with_location(tmp_path, capsys):
    bad = tmp_path / "policy.toml"
    bad.write_text("[cpu]\nmin_cpus = 0\n")
    assert main(["--policy", str(bad), "--check"]) == 2
    assert f"{bad}:2: cpu.min_cpus: must be within" in capsys.readouterr().err
    assert main(["--policy", str(tmp_path / "missing.toml"), "--check"]) == 2
    assert "no such policy file" in capsys.readouterr().err
    assert main(["--policy", str(SHIPPED), "--check"]) == 0


def test_daemonset_configmap_policy_is_valid():
    import yaml

    docs = list(yaml.safe_load_all((REPO / "deploy" / "kata-colo-resourced-daemonset.yaml").read_text()))
    policy = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["resourced.toml"]
    cfg = daemon.load(policy, "configmap", ColoConfig())
    assert cfg.listen == "0.0.0.0:9301" and cfg.policies["cpu"].config.policy == "cpuset"  # type: ignore[attr-defined]

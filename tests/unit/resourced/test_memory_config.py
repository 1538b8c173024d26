"""The ``[memory]`` table: the shipped example loads with its values; bad input stops the daemon
naming the file and line (also inside the N-th ``[[memory.window]]``), and the CLI exits 2."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from resourced import daemon
from resourced.cli import main
from resourced.errors import PolicyError
from resourced.policies.memory_config import Bounds, MemoryConfig
from shim.config import ColoConfig

REPO = Path(__file__).resolve().parents[3]
FILE = "/etc/kata-colo/resourced.toml"


def memory(text: str) -> MemoryConfig:
    cfg = daemon.load(text, FILE, ColoConfig()).policies["memory"].config  # type: ignore[attr-defined]
    assert isinstance(cfg, MemoryConfig)
    return cfg


def test_defaults_and_shipped_policy():
    cfg = memory("")
    assert cfg.enabled and cfg.low_watermark_percent == 10 and cfg.high_watermark_percent == 20
    assert not cfg.evict.enabled and cfg.windows == () and cfg.sandboxes == "offline"
    shipped = memory((REPO / "deploy" / "resourced.toml").read_text())
    assert shipped == MemoryConfig()  # the shipped file documents the defaults
    example = memory((REPO / "deploy" / "resourced-memory-example.toml").read_text())
    assert example.windows and example.per_sandbox and example.evict.enabled


def test_full_table():
    cfg = memory("""
[memory]
low_watermark_percent = 15
high_watermark_percent = 25.5
step_mib = 128
cooldown_s = 2
min_mib = 512
[memory.sandbox."batch-"]
max_mib = 2048
[[memory.window]]
start = "09:00"
end = "21:00"
max_mib = 1024
[[memory.window]]
start = "23:00"
end = "01:00"
min_mib = 768
[memory.evict]
enabled = true
threshold_percent = 85
""")
    assert (cfg.low_watermark_percent, cfg.high_watermark_percent, cfg.step_mib) == (15, 25.5, 128)
    assert cfg.per_sandbox == {"batch-": Bounds(0, 2048)}
    assert [(w.start, w.end, w.min_mib, w.max_mib) for w in cfg.windows] == [
        (dt.time(9), dt.time(21), 0, 1024), (dt.time(23), dt.time(1), 768, 0)]
    assert cfg.evict.enabled and cfg.evict.threshold_percent == 85
    assert cfg.bounds("batch-7", dt.time(12)) == Bounds(512, 1024)
    assert cfg.bounds("batch-7", dt.time(0, 30)) == Bounds(768, 2048)


WINDOWS = '[[memory.window]]\nstart = "09:00"\nend = "10:00"\nmax_mib = 1\n'


@pytest.mark.parametrize("text, line, needle", [
    ("[memory]\nlow_watermark_percent = 30\nhigh_watermark_percent = 20\n", 3,
     "memory.high_watermark_percent: must be at least low_watermark_percent"),
    ("[memory]\nstep_mib = 0\n", 2, "memory.step_mib: must be within"),
    ("[memory]\nsandboxes = \"some\"\n", 2, "must be one of"),
    ("[memory]\nstate_root = \"run/x\"\n", 2, "must be an absolute path"),
    ("[memory]\nwatermark = 3\n", 2, "memory.watermark: unknown key"),
    ("[memory]\nmin_mib = 900\nmax_mib = 800\n", 2, "min_mib 900 is above max_mib 800"),
    ("[memory.sandbox.\"abc\"]\nmax_mib = \"big\"\n", 2, "memory.sandbox.abc.max_mib: must be an integer"),
    (WINDOWS + '[[memory.window]]\nstart = "25:00"\nend = "10:00"\nmax_mib = 1\n', 6,
     "memory.window#2.start: must be a time of day"),
    (WINDOWS + '\n[[memory.window]]\nstart = "08:00"\nend = "08:00"\nmax_mib = 1\n', 8,
     "window 2: start and end are both"),
    (WINDOWS + WINDOWS + '[[memory.window]]\nstart = "01:00"\nend = "02:00"\n', 9,
     "window 3: give min_mib and/or max_mib"),
    ('[[memory.window]]\nstart = "01:00"\nend = "02:00"\nmax_mib = 5\ncap = 3\n', 5, "memory.window#1.cap: unknown"),
    ("[memory]\nwindow = 3\n", 2, "must be an array of tables"),
    ("[memory.evict]\nthreshold_percent = 0\n", 2, "memory.evict.threshold_percent: must be within 1..100"),
])
def test_errors_name_the_line(text, line, needle):
    with pytest.raises(PolicyError) as info:
        memory(text)
    assert info.value.line == line, str(info.value)
    assert needle in str(info.value)
    assert str(info.value).startswith(f"{FILE}:{line}: ")


def test_daemon_refuses_to_start_on_an_invalid_memory_table(tmp_path, capsys):
    bad = tmp_path / "policy.toml"
    bad.write_text("[cpu]\nenabled = false\n\n[memory]\nhigh_watermark_percent = 5\n")
    assert main(["--policy", str(bad)]) == 2  # not --check: the daemon itself does not start
    assert f"{bad}:5: memory.high_watermark_percent: must be at least" in capsys.readouterr().err

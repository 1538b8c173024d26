"""[factory] and [agent.kata] oci_runtime: kata's keys and defaults, validation, kernel params."""
from __future__ import annotations

import pytest

from common.errors import ConfigError
from shim import config as cfgmod
from shim.sandbox.vmconfig import kernel_params


def test_defaults_are_kata_names_under_run_kata_colo():
    f = cfgmod.parse("").factory
    assert (f.enable_template, f.template_path, f.vm_cache_number, f.vm_cache_endpoint) == (
        False, "/run/kata-colo/vm/template", 0, "/run/kata-colo/cache.sock")
    assert cfgmod.load(str(cfgmod.PACKAGED_DEFAULT)).factory == f  # the shipped file says the same


def test_factory_table_parses():
    f = cfgmod.parse('[factory]\nenable_template = true\ntemplate_path = "/run/x/t"\nvm_cache_number = 3\n').factory
    assert f.enable_template and f.template_path == "/run/x/t" and f.vm_cache_number == 3


@pytest.mark.parametrize("text, message", [
    ("vm_cache_number = 2", "needs factory.enable_template"),
    ("enable_template = true\nvm_cache_number = 65", "vm_cache_number must be"),
    ('template_path = "relative"', "template_path must be an absolute"),
    ('template_path = "/"', "template_path must be an absolute"),
    ('vm_cache_endpoint = "/run"', "vm_cache_endpoint must be"),
    ("enable_templates = true", "unknown key factory.enable_templates"),
    ("enable_template = 1", "wrong type"),
])
def test_bad_factory_config_is_a_clear_error(text, message):
    with pytest.raises(ConfigError, match=message):
        cfgmod.parse(f"[factory]\n{text}\n")


def test_guest_oci_runtime_is_a_choice_passed_on_the_kernel_command_line():
    assert "agent.runc=" not in kernel_params(cfgmod.parse(""))
    assert "agent.runc=crun" in kernel_params(cfgmod.parse('[agent.kata]\noci_runtime = "crun"\n')).split()
    with pytest.raises(ConfigError, match="oci_runtime"):
        cfgmod.parse('[agent.kata]\noci_runtime = "youki"\n')

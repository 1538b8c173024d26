"""[storage] and the block/VFIO hypervisor keys: defaults, validation with the key named."""
import pytest

from common.errors import ConfigError
from shim import config


def test_defaults():
    cfg = config.parse("")
    assert cfg.storage.layer_image_format == "erofs" and cfg.storage.data_disk_driver == "nvme"
    assert not cfg.hypervisor.disable_block_device_use and cfg.hypervisor.hot_plug_vfio == "root-port"
    assert cfg.hypervisor.options.block_device_driver == "virtio-blk"


@pytest.mark.parametrize("text, key", [
    ('[storage]\nlayer_image_format = "squashfs"', "storage.layer_image_format"),
    ('[storage]\nlayer_cache_max_mib = 1', "storage.layer_cache_max_mib"),
    ('[storage]\nscratch_dir = "relative"', "storage.scratch_dir"),
    ('[storage]\ndata_disk_driver = "ide"', "storage.data_disk_driver"),
    ('[storage]\nbogus = 1', "storage.bogus"),
    ('[hypervisor.qemu]\nblock_device_driver = "nvdimm"', "block_device_driver"),
    ('[hypervisor.qemu]\ncold_plug_vfio = "switch-port"', "cold_plug_vfio"),
])
def test_bad_values_name_the_key(text, key):
    with pytest.raises(ConfigError, match=key):
        config.parse(text)

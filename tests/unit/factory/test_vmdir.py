"""VM ids and kata's assignSandbox link."""
from __future__ import annotations

import os

import pytest

from common.ids import valid_id
from shim.factory import vmdir


def test_vm_ids_are_unique_path_safe_ids():
    ids = {vmdir.new_vm_id() for _ in range(100)}
    assert len(ids) == 100 and all(valid_id(i) and len(i) == 32 for i in ids)


def test_assign_sandbox_links_and_relinks(tmp_path):
    sb = tmp_path / "sbs" / "sb1"
    sb.mkdir(parents=True)
    link = vmdir.assign_sandbox(tmp_path / "vm" / "a", sb)
    assert os.readlink(link) == str(tmp_path / "vm" / "a")
    vmdir.assign_sandbox(tmp_path / "vm" / "a", sb)  # idempotent
    vmdir.assign_sandbox(tmp_path / "vm" / "b", sb)  # a fallback VM replaces the link
    assert os.readlink(link) == str(tmp_path / "vm" / "b")
    link.unlink()
    (sb / "vm").mkdir()
    with pytest.raises(FileExistsError):
        vmdir.assign_sandbox(tmp_path / "vm" / "c", sb)

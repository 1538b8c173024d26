"""ResourceManager: the write-ahead journal (an entry is on disk before its resource acts),
reverse teardown, failures named and raised (never swallowed) and kept in the journal,
attach/detach, and recovery from the journal alone in a fresh manager."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from common.errors import ResourceError
from shim.resources import manager as rm
from shim.resources.manager import JOURNAL, ResourceContext, ResourceManager
from tests.fakes.resources import FakeResource, Recorder, resource_class


def journal(state: Path) -> list[dict[str, Any]]:
    """Entries of the journal as on disk (the raw file, not read_journal)."""
    path = state / JOURNAL
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    assert data["version"] == rm.JOURNAL_VERSION
    return list(data["entries"])


def kinds(state: Path) -> list[str]:
    return [e["kind"] for e in journal(state)]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "sbs" / "sb1"


def ctx(state: Path) -> ResourceContext:
    return ResourceContext(sandbox_id="sb1", state_dir=state, config=None, spec={}, hypervisor=None)


def made(r: FakeResource) -> bool:
    return r.path.exists()


async def test_entry_is_journaled_before_the_resource_acts(state):
    rec = Recorder()
    seen: dict[str, list[str]] = {}

    def at_before(kind: str):
        def hook(r: FakeResource) -> None:
            seen[kind] = kinds(state)          # the journal as the resource starts to act
            assert not r.path.exists()
        return hook

    a = resource_class("a", rec, hooks={"before_boot": at_before("a")})
    b = resource_class("b", rec, hooks={"before_boot": at_before("b")})
    mgr = ResourceManager("sb1", state)
    patches = await mgr.before_boot([a(state), b(state)], ctx(state))
    assert seen == {"a": ["a"], "b": ["a", "b"]}
    assert [p.kernel_params for p in patches] == [("fake.a=1",), ("fake.b=1",)]
    assert journal(state)[1] == {"kind": "b", "key": "b", "record": {"path": str(state / "b.obj")}}
    assert (state / JOURNAL).stat().st_mode & 0o777 == 0o600 and state.stat().st_mode & 0o777 == 0o700


async def test_ctx_persist_rewrites_the_journal_while_a_resource_works(state):
    """A resource that makes more objects calls ctx.persist() first: its new record is on disk."""
    class Growing(FakeResource):
        kind = "grow"
        fail: dict[str, BaseException] = {}
        hooks: dict[str, Any] = {}
        recorder = Recorder()
        instances: list[FakeResource] = []
        recovered: list[dict[str, Any]] = []
        extra = ""

        def record(self) -> dict[str, Any]:
            return {**super().record(), "extra": self.extra}

        async def before_boot(self, c: ResourceContext):
            self.extra = "tap0"
            c.persist()
            assert journal(c.state_dir)[0]["record"]["extra"] == "tap0"
            return await super().before_boot(c)

    mgr = ResourceManager("sb1", state)
    await mgr.before_boot([Growing(state)], ctx(state))
    assert journal(state)[0]["record"]["extra"] == "tap0"


async def test_teardown_runs_newest_first_and_removes_the_journal(state):
    rec = Recorder()
    classes = [resource_class(k, rec) for k in ("a", "b", "c")]
    mgr = ResourceManager("sb1", state)
    rs = [cls(state) for cls in classes]
    await mgr.before_boot(rs, ctx(state))
    await mgr.after_boot(ctx(state))
    assert rec.phases("after_boot") == ["a", "b", "c"]
    assert all(made(r) for r in rs)
    await mgr.teardown()
    assert rec.phases("teardown") == ["c", "b", "a"]
    assert not any(made(r) for r in rs)
    assert not (state / JOURNAL).exists() and mgr.resources() == []


async def test_a_failed_before_boot_is_still_torn_down(state):
    """The entry is journaled before the resource acts, so a resource that failed half way is
    torn down too (it may have made something before raising)."""
    rec = Recorder()
    a = resource_class("a", rec)
    b = resource_class("b", rec, fail={"before_boot": ResourceError("tap busy")})
    mgr = ResourceManager("sb1", state)
    with pytest.raises(ResourceError, match="tap busy"):
        await mgr.before_boot([a(state), b(state)], ctx(state))
    assert kinds(state) == ["a", "b"]
    await mgr.teardown()
    assert rec.phases("teardown") == ["b", "a"]
    assert not (state / JOURNAL).exists()


async def test_failing_teardown_is_logged_raised_and_stays_journaled(state, caplog):
    rec = Recorder()
    a = resource_class("a", rec)
    b = resource_class("bad", rec, fail={"teardown": ResourceError("umount: busy")})
    c = resource_class("c", rec)
    mgr = ResourceManager("sb1", state)
    ra, rb, rc = a(state), b(state), c(state)
    await mgr.before_boot([ra, rb, rc], ctx(state))
    caplog.set_level(logging.ERROR, logger="shim.resources.manager")
    with pytest.raises(ResourceError, match=r"bad: umount: busy") as err:
        await mgr.teardown()
    assert "sb1" in str(err.value)
    assert rec.phases("teardown") == ["c", "bad", "a"]     # the others were still released
    assert not made(ra) and not made(rc) and made(rb)
    assert kinds(state) == ["bad"]                          # what failed stays for delete
    assert any("bad teardown failed" in r.getMessage() for r in caplog.records)
    # a retry (delete) succeeds once the cause is gone
    b.fail.clear()
    await mgr.teardown()
    assert not made(rb) and not (state / JOURNAL).exists()


async def test_untyped_teardown_error_is_logged_with_traceback(state, caplog):
    rec = Recorder()
    a = resource_class("a", rec, fail={"teardown": KeyError("bug")})
    mgr = ResourceManager("sb1", state)
    await mgr.before_boot([a(state)], ctx(state))
    with pytest.raises(ResourceError, match="a: 'bug'"):
        await mgr.teardown()
    assert any(r.exc_info for r in caplog.records if "a teardown failed" in r.getMessage())


async def test_attach_and_detach(state):
    rec = Recorder()
    base, vol = resource_class("base", rec), resource_class("volume", rec)
    mgr = ResourceManager("sb1", state)
    await mgr.before_boot([base(state)], ctx(state))
    seen = []
    vol.hooks["before_boot"] = lambda r: seen.append(kinds(state))
    v = vol(state)
    await mgr.attach(v, ctx(state), key="volume-1")
    assert seen == [["base", "volume"]]                      # journaled before it acted
    assert [e["key"] for e in journal(state)] == ["base", "volume-1"]
    assert rec.phases("before_boot") == ["base", "volume"] and rec.phases("after_boot") == ["volume"]
    assert mgr.get("volume") is v and made(v)
    await mgr.detach("volume-1")
    assert not made(v) and kinds(state) == ["base"] and mgr.get("volume") is None
    await mgr.detach("volume-1")                             # idempotent


async def test_failed_attach_is_torn_down_and_forgotten(state):
    rec = Recorder()
    vol = resource_class("volume", rec, fail={"after_boot": ResourceError("guest mount failed")})
    mgr = ResourceManager("sb1", state)
    v = vol(state)
    with pytest.raises(ResourceError, match="guest mount failed"):
        await mgr.attach(v, ctx(state))
    assert rec.phases("teardown") == ["volume"] and not made(v)
    assert kinds(state) == []


async def test_attach_whose_teardown_also_fails_stays_journaled(state):
    rec = Recorder()
    vol = resource_class("volume", rec, fail={"before_boot": ResourceError("first"),
                                              "teardown": ResourceError("second")})
    mgr = ResourceManager("sb1", state)
    with pytest.raises(ResourceError, match="second"):
        await mgr.attach(vol(state), ctx(state))
    assert kinds(state) == ["volume"]


async def test_duplicate_key_is_refused(state):
    rec = Recorder()
    a = resource_class("a", rec)
    mgr = ResourceManager("sb1", state)
    await mgr.before_boot([a(state)], ctx(state))
    with pytest.raises(ResourceError, match="already present"):
        await mgr.attach(a(state), ctx(state))


async def test_note_and_forget_a_fixed_record(state):
    mgr = ResourceManager("sb1", state)
    mgr.note("vm", {"driver": "fake", "pid": 0})
    mgr.note("vm", {"driver": "fake", "pid": 42})
    assert journal(state) == [{"kind": "vm", "key": "vm", "record": {"driver": "fake", "pid": 42}}]
    mgr.forget("vm")
    assert journal(state) == []


# -- recovery from the journal alone (a fresh process) -------------------------------------------

async def _crashed_sandbox(state: Path, rec: Recorder, *kinds_: str) -> list[type[FakeResource]]:
    classes = [resource_class(k, rec) for k in kinds_]
    mgr = ResourceManager("sb1", state)
    await mgr.before_boot([cls(state) for cls in classes], ctx(state))
    mgr.note("vm", {"driver": "fake", "pid": 1234})
    return classes  # the manager is dropped: only the journal and the files remain


async def test_recover_newest_first_then_removes_the_journal(state):
    rec = Recorder()
    a, b = await _crashed_sandbox(state, rec, "a", "b")
    order: list[str] = []

    async def vm(record: dict[str, Any]) -> None:
        order.append(f"vm:{record['pid']}")

    async def kind(cls: type[FakeResource], record: dict[str, Any]) -> None:
        order.append(cls.kind)
        await cls.recover(record)

    await rm.recover(state, {"vm": vm, "a": lambda r: kind(a, r), "b": lambda r: kind(b, r)})
    assert order == ["vm:1234", "b", "a"]
    assert not (state / "a.obj").exists() and not (state / "b.obj").exists()
    assert not (state / JOURNAL).exists()


async def test_recover_keeps_and_raises_what_failed(state, caplog):
    rec = Recorder()
    a, b, c = await _crashed_sandbox(state, rec, "a", "b", "c")
    b.fail["recover"] = ResourceError("cgroup busy")

    async def vm(record: dict[str, Any]) -> None:
        raise ResourceError("qemu survived")

    with pytest.raises(ResourceError) as err:
        await rm.recover(state, {"vm": vm, "a": a.recover, "b": b.recover, "c": c.recover})
    assert "recovery incomplete" in str(err.value)
    assert "b: cgroup busy" in str(err.value) and "vm: qemu survived" in str(err.value)
    assert rec.phases("recover") == ["c", "b", "a"]          # every entry was tried
    assert kinds(state) == ["b", "vm"]                        # oldest first, as written
    assert any("recovering b failed" in r.getMessage() for r in caplog.records)
    b.fail.clear()

    async def vm_ok(record: dict[str, Any]) -> None:
        return None

    await rm.recover(state, {"vm": vm_ok, "a": a.recover, "b": b.recover, "c": c.recover})
    assert not (state / JOURNAL).exists() and not (state / "b.obj").exists()


async def test_recover_unknown_kind_is_kept(state):
    rec = Recorder()
    await _crashed_sandbox(state, rec, "mystery")
    with pytest.raises(ResourceError, match="unknown resource kind 'mystery'"):
        await rm.recover(state, {"vm": lambda r: _noop()})
    assert kinds(state) == ["mystery"]


async def _noop() -> None:
    return None


async def test_recover_a_hung_entry_times_out_and_stays(state):
    rec = Recorder()
    (a,) = await _crashed_sandbox(state, rec, "a")

    async def hang(record: dict[str, Any]) -> None:
        import asyncio
        await asyncio.sleep(60)

    with pytest.raises(ResourceError, match="vm: TimeoutError"):
        await rm.recover(state, {"vm": hang, "a": a.recover}, timeout=0.2)
    assert kinds(state) == ["vm"] and not (state / "a.obj").exists()


async def test_recover_without_journal_is_a_noop(state):
    await rm.recover(state, {})
    state.mkdir(parents=True)
    (state / JOURNAL).write_text(json.dumps({"version": rm.JOURNAL_VERSION, "sandbox_id": "sb1", "entries": []}))
    await rm.recover(state, {})
    assert not (state / JOURNAL).exists()


@pytest.mark.parametrize("content, message", [
    (b"{not json", "unreadable resource journal"),
    (b'{"version": 99, "entries": []}', "unsupported version 99"),
    (b'{"version": 1, "entries": {"a": 1}}', "unreadable resource journal"),
    (b'{"version": 1, "entries": [{"key": "x"}]}', "unreadable resource journal"),
    (b'[1, 2]', "unreadable resource journal"),
    (b"\xff\xfe", "unreadable resource journal"),
])
async def test_corrupt_journal_is_a_clear_error(state, content, message):
    state.mkdir(parents=True)
    (state / JOURNAL).write_bytes(content)
    with pytest.raises(ResourceError, match=message) as err:
        await rm.recover(state, {})
    assert str(state / JOURNAL) in str(err.value)
    assert (state / JOURNAL).read_bytes() == content          # left for a human to look at


async def test_oversized_journal_is_a_clear_error(state, monkeypatch):
    monkeypatch.setattr(rm, "MAX_JOURNAL_BYTES", 64)
    state.mkdir(parents=True)
    (state / JOURNAL).write_text(json.dumps({"version": 1, "entries": [{"kind": "a" * 100}]}))
    with pytest.raises(ResourceError, match="journal larger than 64 bytes"):
        await rm.recover(state, {})


def test_journal_write_is_atomic(state, monkeypatch):
    """A failure while writing leaves the previous journal intact and no temp file behind."""
    state.mkdir(parents=True)
    rm.write_journal(state / JOURNAL, "sb1", [{"kind": "a", "key": "a", "record": {}}])
    before = (state / JOURNAL).read_text()

    def boom(*a: Any, **kw: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(rm.os, "replace", boom)
    with pytest.raises(OSError):
        rm.write_journal(state / JOURNAL, "sb1", [])
    assert (state / JOURNAL).read_text() == before
    assert sorted(p.name for p in state.iterdir()) == [JOURNAL]

"""Fast start and host memory per idle sandbox: cold boot vs template clone vs pre-booted clone
(the VM cache), all measured in one run against the same kernel, image and QEMU.

1. ``ctr run --rm`` → first output, per mode (cold/runc, cold/crun, template/runc, template/crun,
   cache/crun), with the breakdown from the shim's log lines: containerd (ctr exec → the shim's
   ``start`` exec'd), shim start (→ serving), VM (→ the sandbox's VM ready: Create, resources,
   boot or clone, agent, identity reset, CreateSandbox), guest create (→ first output).
2. CRI RunPodSandbox per mode (cold, template, cache), one private containerd per mode.
3. Host memory per idle sandbox (a container running ``sleep``): qemu PSS (anon/file/shmem) and
   shim PSS — the node's configuration as it was (initramfs root, QEMU's default TCG cache) vs
   the lean cold configuration (read-only root image, ``tcg_tb_size``, free page reporting);
   then 4 idle cold VMs vs 4 idle clones (their template's tmpfs counted once on top).
4. The TCG cost of a smaller translation cache: a guest shell loop with the default vs the lean
   ``tcg_tb_size``.

Configurations are written for the run from the node's one (its kernel, QEMU, image directory;
the lean ones need ``rootfs.erofs`` + ``initrd-boot.cpio`` next to its initrd, built by
vm-images/build.py). ``KC_BENCH_ROUNDS`` (default 3) rounds per timing.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("KC_BENCH_ROUNDS", "3"))
IMAGE = "docker.io/library/busybox:kata-colo"
RUNTIME = "io.containerd.kata-colo.v2"
TB_MIB = 32
SETTLE = 15.0
STATE_ROOT = Path("/run/kata-colo/sbs")
LOOP = "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done"


def _toml(node, work: Path, *, lean: bool, runtime: str = "runc", template: str = "", cache: int = 0,
          reclaim: bool = False, tb: int | None = None) -> str:
    """A configuration: the node's kernel and QEMU; ``lean`` = the read-only root image and a
    ``TB_MIB`` translation cache (``tb`` overrides it), else the node's initramfs."""
    hv = node.hypervisor
    images = Path(hv.initrd).parent
    disk = f'image = "{images / "rootfs.erofs"}"\ninitrd = "{images / "initrd-boot.cpio"}"' if lean \
        else f'initrd = "{images / "initramfs.cpio"}"'
    out = f"""[hypervisor.qemu]
path = "{hv.binary}"
kernel = "{hv.kernel}"
{disk}
pcie_root_ports = 4
tcg_tb_size = {(TB_MIB if lean else 0) if tb is None else tb}
reclaim_guest_freed_memory = {str(reclaim).lower()}

[agent.kata]
oci_runtime = "{runtime}"
"""
    if template:
        out += f"""
[factory]
enable_template = true
template_path = "{work / template}"
vm_cache_number = {cache}
vm_cache_endpoint = "{work / 'cache.sock'}"
"""
    return out


def write_configs(work: Path) -> dict[str, Path]:
    from shim import config as cfgmod

    node = cfgmod.load()
    images = Path(node.hypervisor.initrd).parent
    if not (images / "rootfs.erofs").exists() or not (images / "initrd-boot.cpio").exists():
        raise SystemExit(f"bench_factory: {images} has no rootfs.erofs/initrd-boot.cpio (rebuild the image)")
    texts = {
        "node": _toml(node, work, lean=False),
        "node-tb": _toml(node, work, lean=False, tb=TB_MIB),
        "cold-runc": _toml(node, work, lean=True),
        "cold-crun": _toml(node, work, lean=True, runtime="crun"),
        "cold-lean": _toml(node, work, lean=True, runtime="crun", reclaim=True),
        "template-runc": _toml(node, work, lean=True, template="tmpl-runc"),
        "template-crun": _toml(node, work, lean=True, runtime="crun", template="tmpl-crun"),
        "cache-crun": _toml(node, work, lean=True, runtime="crun", template="tmpl-crun", cache=1),
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = work / f"{name}.toml"
        paths[name].write_text(text)
    return paths


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def factory_cli(action: str, config: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "shim.factory", action, "--config", str(config)],
                       capture_output=True, text=True, env=_env(), timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"factory {action}: {r.stderr}")


@contextlib.contextmanager
def cache_daemon(config: Path, work: Path):
    log = open(work / "vmcache.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "shim.factory.cache_server", "--config", str(config)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_cache_ready(config, proc)
        yield proc
    finally:
        subprocess.run([sys.executable, "-m", "shim.factory", "destroy", "--config", str(config)],
                       capture_output=True, env=_env(), timeout=120)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def wait_cache_ready(config: Path, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = subprocess.run([sys.executable, "-m", "shim.factory", "status", "--config", str(config)],
                            capture_output=True, text=True, env=_env()).stdout
        if "(ready)" in st:
            return
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"VM cache not ready: {st}")
        time.sleep(0.3)


# -- ctr run → first output ----------------------------------------------------------------------

_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _log_times(c, name: str) -> dict[str, float]:
    """Timestamps (wall clock) of the shim's log lines for sandbox ``name``."""
    out: dict[str, float] = {}
    for line in (c.dir / "containerd.log").read_text(errors="replace").splitlines():
        m = _TS.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if f"serving sandbox {name} " in line:
            out["serving"] = t
            ms = re.search(r", (\d+) ms after `start` was exec'd", line)
            if ms:
                out["exec"] = t - int(ms.group(1)) / 1e3
        elif f"sandbox {name}: VM pid" in line and "ready" in line:
            out["vm_ready"] = t
        elif f"sandbox {name} VM: " in line:
            out["how"] = 0.0 if "cold" in line else (1.0 if "clone of template" in line else 2.0)
    return out


def ctr_run(c, config: Path, name: str, script: str = "echo first-output") -> dict[str, float]:
    t0 = time.time()
    proc = subprocess.Popen(["ctr", "-a", c.address, "run", "--rm", "--runtime", RUNTIME, "--runtime-config-path",
                             str(config), IMAGE, name, "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t_first = time.time()
    rest, err = proc.communicate(timeout=300)
    if b"first-output" not in line:
        raise RuntimeError(f"{name}: unexpected output {line!r} {err.decode(errors='replace')}")
    lt = _log_times(c, name)
    return {"total": t_first - t0, "containerd": lt.get("exec", t0) - t0,
            "shim": lt.get("serving", t0) - lt.get("exec", t0), "vm": lt.get("vm_ready", t0) - lt.get("serving", t0),
            "guest": t_first - lt.get("vm_ready", t_first), "rest": rest}


def bench_ctr(c, configs: dict[str, Path], work: Path) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {}
    for mode in ("template-runc", "template-crun"):
        factory_cli("init", configs[mode])  # the template is built once, not timed
    order = ["cold-runc", "cold-crun", "template-runc", "template-crun"]
    for r in range(ROUNDS):  # interleaved: the machine's load drifts
        for mode in order:
            results.setdefault(mode, []).append(ctr_run(c, configs[mode], f"kc-bf-{mode}-{r}"))
    with cache_daemon(configs["cache-crun"], work) as daemon:
        for r in range(ROUNDS):
            wait_cache_ready(configs["cache-crun"], daemon)
            results.setdefault("cache-crun", []).append(ctr_run(c, configs["cache-crun"], f"kc-bf-cache-{r}"))
    return results


# -- CRI RunPodSandbox ---------------------------------------------------------------------------

def cri_run_pods(config: Path, work: Path, tag: str) -> list[float]:
    from cri.client import CriClient, pod_config
    from tests.support.containerd import product_shim_dir, start_containerd, stop_containerd

    shim_dir = product_shim_dir()
    old = os.environ.get("KATA_COLO_CONFIG")
    os.environ["KATA_COLO_CONFIG"] = str(config)
    try:
        c = start_containerd([shim_dir])
    finally:
        os.environ.pop("KATA_COLO_CONFIG")
        if old is not None:
            os.environ["KATA_COLO_CONFIG"] = old

    async def go() -> list[float]:
        times = []
        async with CriClient(c.address) as client:
            for r in range(ROUNDS):
                cfg = pod_config(f"kc-bf-{tag}-{r}", "kc-bench", uid=f"kc-bf-{tag}-{r}")
                if "cache" in tag:
                    await asyncio.to_thread(wait_cache_ready, config)
                t0 = time.monotonic()
                pod = await client.run_pod_sandbox(cfg, runtime_handler="kata-colo")
                times.append(time.monotonic() - t0)
                await client.stop_pod_sandbox(pod)
                await client.remove_pod_sandbox(pod)
        return times

    try:
        return asyncio.run(go())
    finally:
        stop_containerd(c)
        shutil.rmtree(shim_dir, ignore_errors=True)


# -- memory --------------------------------------------------------------------------------------

def smaps(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    return out


def _pids(name: str) -> tuple[int, int]:
    import json

    state = json.loads((STATE_ROOT / name / "state.json").read_text())
    qemu = int((STATE_ROOT / name / "vm" / "qemu.pid").read_text())
    return qemu, int(state["shim_pid"])


def idle_memory(c, config: Path, names: list[str]) -> dict[str, float]:
    """Start ``names`` (each a sandbox running sleep), let them settle, sum their PSS (MiB)."""
    for n in names:
        c.ctr("run", "-d", "--runtime", RUNTIME, "--runtime-config-path", str(config), IMAGE, n, "sleep", "3600")
    try:
        time.sleep(SETTLE)
        tot: dict[str, float] = {"qemu": 0, "anon": 0, "file": 0, "shmem": 0, "shim": 0}
        for n in names:
            qemu, shim = _pids(n)
            q, s = smaps(qemu), smaps(shim)
            tot["qemu"] += q["Pss"] / 1024
            tot["anon"] += q.get("Pss_Anon", 0) / 1024
            tot["file"] += q.get("Pss_File", 0) / 1024
            tot["shmem"] += q.get("Pss_Shmem", 0) / 1024
            tot["shim"] += s["Pss"] / 1024
        return tot
    finally:
        for n in names:
            c.ctr("task", "kill", "-s", "KILL", n, check=False)
        time.sleep(1)
        for n in names:
            c.ctr("task", "delete", "-f", n, check=False)
            c.ctr("container", "delete", n, check=False)


def template_tmpfs_mib(template: Path) -> float:
    st = os.statvfs(template)
    return (st.f_blocks - st.f_bfree) * st.f_frsize / (1 << 20)


def tcg_loop(c, config: Path, name: str) -> float:
    """Seconds of a guest shell loop, timed on the host between two output lines."""
    proc = subprocess.Popen(["ctr", "-a", c.address, "run", "--rm", "--runtime", RUNTIME, "--runtime-config-path",
                             str(config), IMAGE, name, "sh", "-c", f"echo go; {LOOP}; echo done"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    t0 = time.monotonic()
    proc.stdout.readline()
    elapsed = time.monotonic() - t0
    proc.wait(120)
    return elapsed


# -- report --------------------------------------------------------------------------------------

def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report_ctr(results: dict[str, list[dict[str, float]]]) -> None:
    print(f"ctr run --rm → first output, median of {ROUNDS} (s); breakdown from the shim's log")
    print(f"{'mode':<15}{'total':>7}{'ctrd':>7}{'shim':>7}{'VM':>7}{'guest':>7}   all")
    for mode, rows in results.items():
        parts = "".join(f"{_median(rows, k):>7.2f}" for k in ("total", "containerd", "shim", "vm", "guest"))
        print(f"{mode:<15}{parts}   {[round(r['total'], 2) for r in rows]}")
    cold = _median(results["cold-crun"], "total")
    for mode in ("template-crun", "cache-crun"):
        print(f"ratio {mode}/cold-crun: {_median(results[mode], 'total') / cold:.2f}x "
              f"({cold - _median(results[mode], 'total'):.2f}s saved)")
    print(f"guest OCI runtime crun/runc (template, guest create): "
          f"{_median(results['template-crun'], 'guest') / _median(results['template-runc'], 'guest'):.2f}x")


def main() -> None:
    sys.path.insert(0, str(REPO))
    if os.geteuid() != 0 or shutil.which("containerd") is None:
        print("bench_factory: needs root and containerd; skipped")
        return
    from tests.support.containerd import product_shim_dir, start_containerd, stop_containerd

    work = Path(tempfile.mkdtemp(prefix="kc-bench-fac-", dir="/run"))
    configs = write_configs(work)
    shim_dir = product_shim_dir()
    c = start_containerd([shim_dir])
    try:
        c.import_busybox()
        results = bench_ctr(c, configs, work)
        report_ctr(results)

        pods = {"cold": cri_run_pods(configs["cold-crun"], work, "cold"),
                "template": cri_run_pods(configs["template-crun"], work, "template")}
        with cache_daemon(configs["cache-crun"], work):
            pods["cache"] = cri_run_pods(configs["cache-crun"], work, "cache")
        print(f"\nCRI RunPodSandbox, median of {ROUNDS} (s)")
        for mode, times in pods.items():
            print(f"{mode:<10}{statistics.median(times):>7.2f}   {[round(t, 2) for t in times]}")
        print(f"ratio template/cold: {statistics.median(pods['template']) / statistics.median(pods['cold']):.2f}x, "
              f"cache/cold: {statistics.median(pods['cache']) / statistics.median(pods['cold']):.2f}x")

        print(f"\nhost memory per idle sandbox (PSS MiB, {SETTLE:.0f} s after start, container running sleep)")
        before = idle_memory(c, configs["node"], ["kc-bf-mem-node"])
        after = idle_memory(c, configs["cold-lean"], ["kc-bf-mem-lean"])
        for label, m in (("before: node config (initramfs, default TCG cache)", before),
                         (f"after: root image + tcg_tb_size={TB_MIB} + free page reporting", after)):
            print(f"{label:<62} qemu {m['qemu']:6.1f} (anon {m['anon']:.1f}, file {m['file']:.1f}, "
                  f"shmem {m['shmem']:.1f}) + shim {m['shim']:.1f} = {m['qemu'] + m['shim']:6.1f}")
        print(f"ratio after/before: {(after['qemu'] + after['shim']) / (before['qemu'] + before['shim']):.2f}x")
        cold4 = idle_memory(c, configs["cold-lean"], [f"kc-bf-cold{i}" for i in range(4)])
        factory_cli("init", configs["template-crun"])
        clones4 = idle_memory(c, configs["template-crun"], [f"kc-bf-clone{i}" for i in range(4)])
        tmpl = template_tmpfs_mib(work / "tmpl-crun")
        c4, k4 = cold4["qemu"] + cold4["shim"], clones4["qemu"] + clones4["shim"]
        print(f"4 idle cold VMs: {c4:.1f} MiB (qemu {cold4['qemu']:.1f} + shims {cold4['shim']:.1f})")
        print(f"4 idle clones:   {k4:.1f} MiB (qemu {clones4['qemu']:.1f}, of which template pages "
              f"{clones4['shmem']:.1f}, + shims {clones4['shim']:.1f}); template tmpfs {tmpl:.1f} MiB")
        print(f"ratio clones/cold: {k4 / c4:.2f}x (PSS), {(k4 + tmpl) / c4:.2f}x counting the whole template")

        print(f"\nTCG cost of tcg_tb_size={TB_MIB} (a guest shell loop, s)")
        loops = {"default": [], "small": []}
        for r in range(ROUNDS):
            loops["default"].append(tcg_loop(c, configs["node"], f"kc-bf-loop-d{r}"))
            loops["small"].append(tcg_loop(c, configs["node-tb"], f"kc-bf-loop-s{r}"))
        d, s = statistics.median(loops["default"]), statistics.median(loops["small"])
        print(f"default cache {d:.2f}s, {TB_MIB} MiB {s:.2f}s: ratio {s / d:.2f}x "
              f"{[round(x, 2) for x in loops['default']]} {[round(x, 2) for x in loops['small']]}")
    finally:
        stop_containerd(c)
        shutil.rmtree(shim_dir, ignore_errors=True)
        for mode in ("template-runc", "template-crun"):
            subprocess.run([sys.executable, "-m", "shim.factory", "destroy", "--config", str(configs[mode])],
                           capture_output=True, env=_env(), timeout=120)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

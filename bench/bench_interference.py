"""Co-location interference: online latency beside offline kata-colo VMs, per scheduling policy.

Online (in its own cgroup): (a) the CPU-duty probe — on each CPU, every 5 ms, a fixed ~2 ms of
CPU work (calibrated once with the VMs frozen), the wall time of each unit recorded; (b) nginx
(Debian nginx-light) in a runc container, driven at a fixed rate by the open-loop load generator
(libcurl, latency from each request's scheduled send time). Offline: one or two kata-colo VMs,
2 vCPUs each, started by ``ctr run`` through the real shim with the shipped configuration
(private cgroup root), all vCPUs running the worker whose work units/s is the throughput.

Modes are interleaved (shuffled within each round) and repeated; the VMs boot once and are
switched between modes by the v1 freezer (a frozen VM costs no CPU) and by rewriting their knobs
(the files the shim writes). Each mode's numbers are the median over rounds; latencies print as
ratios to "online alone" of the same round set, throughput as a ratio to "offline alone".
"defaults+resourced" runs the real kata-colo-resourced (shipped policy, tiers = the bench's
groups). Finally the suppression reaction time: online burst → offline cpuset change, and back.

    python -m bench interference [--quick] [--rounds N] [--window S]
"""
from __future__ import annotations

import argparse
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PERIOD_US, WORK_US = 5000, 2000
NGINX_RATE, NGINX_CONNS = 500.0, 8
SETTLE_S = 0.7
RESOURCED_SETTLE_S = 1.5


@dataclass(frozen=True)
class Mode:
    name: str
    online: str            # probe | nginx | none
    vms: int               # how many VMs are thawed
    policy: str            # key of the policy table


@dataclass
class Result:
    lat: list[dict[str, float]] = field(default_factory=list)      # per round: percentile summary (ms)
    lat_all: list[float] = field(default_factory=list)              # every round's samples, pooled
    base_all: list[float] = field(default_factory=list)
    tput: list[float] = field(default_factory=list)                 # per round: units/s, all thawed VMs
    base: list[dict[str, float]] = field(default_factory=list)     # the paired "alone" window before each
    foreign: list[float] = field(default_factory=list)              # cores used outside the bench meanwhile


def modes(quick: bool) -> list[Mode]:
    probe = ["noqos", "shares2", "sched_idle", "idle", "idle_vmm_idle", "defaults", "rd_cpuset", "rd_quota"]
    nginx = ["noqos", "idle", "defaults", "rd_cpuset", "rd_quota"]
    if quick:
        probe, nginx = ["noqos", "idle", "defaults", "rd_cpuset"], ["noqos", "defaults", "rd_cpuset"]
    # "alone vs alone": both windows of the pair with every VM frozen — the noise floor of a ratio
    out = [Mode("probe alone (noise floor)", "probe", 0, "noqos"),
           Mode("nginx alone (noise floor)", "nginx", 0, "noqos")]
    out += [Mode(f"probe + 2 VMs {p}", "probe", 2, p) for p in probe]
    out += [Mode("probe + 1 VM noqos", "probe", 1, "noqos"), Mode("probe + 1 VM defaults", "probe", 1, "defaults")]
    out += [Mode(f"nginx + 2 VMs {p}", "nginx", 2, p) for p in nginx]
    out += [Mode("offline alone 1 VM", "none", 1, "noqos"), Mode("offline alone 2 VMs", "none", 2, "noqos")]
    out += [Mode(f"offline 2 VMs {p}, online idle", "none", 2, p) for p in ("defaults", "rd_cpuset", "rd_quota")]
    return out


def policies(shipped_colo: object) -> dict[str, object]:
    from bench.probe.offline import NEUTRAL, Policy
    from shim.resources.qos.model import CpuKnobs, from_colo_config

    q = from_colo_config(shipped_colo)
    low = q.priority(q.lowest)
    defaults = Policy("shipped defaults", root=replace(NEUTRAL, **_set(q.root)),
                      vcpu=replace(NEUTRAL, **_set(low.knobs)), vmm=replace(NEUTRAL, **_set(q.vmm)),
                      sched_idle=low.sched_idle)
    idle = CpuKnobs(cpu_idle=True, cfs_quota_us=-1)
    return {
        "noqos": Policy("no QoS"),
        "shares2": Policy("low cpu_shares=2", vcpu=replace(NEUTRAL, cpu_shares=2)),
        "sched_idle": Policy("shares 2 + SCHED_IDLE vCPUs", root=replace(NEUTRAL, cpu_shares=2),
                             vcpu=replace(NEUTRAL, cpu_shares=2), sched_idle=True),
        "idle": Policy("cpu.idle root+low", root=idle, vcpu=idle),
        "idle_vmm_idle": Policy("cpu.idle root+low+vmm", root=idle, vcpu=idle, vmm=idle),
        "defaults": defaults,
        "rd_cpuset": replace(defaults, name="defaults + resourced cpuset", resourced="cpuset"),
        "rd_quota": replace(defaults, name="defaults + resourced cfs_quota", resourced="cfs_quota"),
    }


def _set(knobs: object) -> dict[str, object]:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(knobs).items() if v is not None}  # type: ignore[call-overload]


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.tag = secrets.token_hex(3)
        self.root = f"kc-bench-{self.tag}"           # the VMs' offline root ([colo] cgroup_root)
        self.online_name = f"kc-bench-{self.tag}-online"
        self.vms: list = []
        self.freezers: list = []
        self.cleanups: list = []
        self.resourced: subprocess.Popen[bytes] | None = None
        self.reaction_discarded = 0
        self.loadgen_notes: list[str] = []
        self.resourced_log = Path(f"/tmp/kc-interf-resourced-{self.tag}.log")

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from bench.probe import build
        from bench.probe.offline import Freezer, Knobs, OfflineVM, worker_image_tar
        from bench.probe.online import Nginx, OnlineGroup, calibrate
        from shim import config as shimcfg
        from shim.resources.qos.detect import detect_driver
        from tests.support.containerd import product_shim_dir, start_containerd, stop_containerd

        self.bins = build(self.work / "bin")
        self.driver = detect_driver()
        shipped = (REPO / "shim" / "defaults" / "configuration.toml").read_text()
        conf = shipped.replace("\n[colo]\n", f'\n[colo]\ncgroup_root = "{self.root}"\n', 1)
        assert conf != shipped, "the shipped configuration has no [colo] table"
        self.conf = self.work / "configuration.toml"
        self.conf.write_text(conf)
        self.colo = shimcfg.parse(conf, str(self.conf)).colo
        self.policies = policies(self.colo)
        os.environ["KATA_COLO_CONFIG"] = str(self.conf)
        self.online = OnlineGroup(self.online_name, self.driver)
        self.cleanups.append(self.online.remove)
        self.iters = calibrate(self.bins["probe"], WORK_US, self.online)
        self.nginx = Nginx(f"{self.online_name}/nginx", 20000 + secrets.randbelow(20000))
        self.nginx.start()
        self.cleanups.append(self.nginx.stop)
        shim_dir = product_shim_dir()
        c = start_containerd([shim_dir])
        self.cleanups.append(lambda: (stop_containerd(c), shutil.rmtree(shim_dir, ignore_errors=True)))
        tar = self.work / "worker.tar"
        worker_image_tar(self.bins["worker"], tar)
        c.ctr("image", "import", str(tar))
        for i in range(2):
            vm = OfflineVM(f"kc-bench-{self.tag}-vm{i}", c.address)
            self.vms.append(vm)
            self.cleanups.append(vm.stop)
            t0 = time.monotonic()
            vm.start()
            print(f"VM {i}: worker running {time.monotonic() - t0:.1f}s after ctr run", flush=True)
            fr = Freezer(f"kc-bench-{self.tag}-vm{i}")
            fr.add(vm.qemu_pid())
            self.freezers.append(fr)
            self.cleanups.append(fr.remove)
        self.knobs = Knobs(self.driver, self.root)
        self.cleanups.append(lambda: self.driver.remove_tree(self.root, ""))
        self.cleanups.reverse()
        print(f"probe: {WORK_US} us of work every {PERIOD_US} us on CPUs 0-1 ({self.iters} iterations); "
              f"nginx at {NGINX_RATE:g} req/s over {NGINX_CONNS} connections; VMs: 2 × 2 vCPUs, "
              f"annotation low:2; cgroup root {self.root}", flush=True)

    def teardown(self) -> None:
        self.stop_resourced()
        for fn in self.cleanups:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep releasing the rest
                print(f"cleanup: {exc}", file=sys.stderr)

    # -- resourced ------------------------------------------------------------------------------
    def start_resourced(self, policy: str) -> None:
        text = (REPO / "deploy" / "resourced.toml").read_text()
        text += (f'\n[tiers]\nonline = ["{self.online_name}"]\noffline = ["{self.root}"]\n')
        text = text.replace('listen = "127.0.0.1:9301"', 'listen = ""').replace(
            'policy = "cpuset"', f'policy = "{policy}"')
        f = self.work / f"resourced-{policy}.toml"
        f.write_text(text)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        log = open(self.resourced_log, "ab")
        self.resourced = subprocess.Popen([sys.executable, "-m", "resourced", "--policy", str(f), "--kata-config",
                                           str(self.conf), "--log-level", "debug"], env=env, stdout=log, stderr=log)
        log.close()

    def stop_resourced(self) -> None:
        if self.resourced is not None:
            self.resourced.send_signal(signal.SIGTERM)
            try:
                self.resourced.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.resourced.kill()
                self.resourced.wait()
            self.resourced = None

    # -- one mode ------------------------------------------------------------------------------
    def _online(self, kind: str, window: float) -> list[float]:
        """Run the online workload for ``window`` s: its latencies in ms (probe: unit wall times)."""
        from bench.probe.online import run_loadgen, run_probe

        if kind == "probe":
            units, _resps = run_probe(self.bins["probe"], self.online, "0-1", self.iters, PERIOD_US, window)
            return [u / 1e6 for u in units]
        lat, note = run_loadgen(self.bins["loadgen"], self.online, self.nginx.url, NGINX_RATE, window, NGINX_CONNS)
        self.loadgen_notes.append(note)
        return [x / 1e6 for x in lat]

    def _foreign(self) -> int:
        """CPU ns used on the host outside the bench's online group and offline root."""
        d = self.driver
        return d.cpu_usage_ns("") - d.cpu_usage_ns(self.online_name) - d.cpu_usage_ns(self.root)

    def run_mode(self, mode: Mode, window: float, result: Result) -> None:
        """One window of ``mode``. An online mode with VMs is paired: the same online workload
        runs first with every VM frozen (its own "alone" baseline, a few seconds earlier), and
        the ratio of the pair is kept — the host is shared and its background load drifts."""
        from bench.probe.stats import summary, throughput

        if mode.online != "none":
            for fr in self.freezers:
                fr.set(True)
            time.sleep(SETTLE_S / 2)
            base = self._online(mode.online, window)
            result.base.append(summary(base))
            result.base_all.extend(base)
        for i, fr in enumerate(self.freezers):
            fr.set(i >= mode.vms)
        policy = self.policies[mode.policy]
        self.knobs.apply(policy)  # type: ignore[arg-type]
        if policy.resourced:  # type: ignore[attr-defined]
            self.start_resourced(policy.resourced)  # type: ignore[attr-defined]
            time.sleep(RESOURCED_SETTLE_S)
        time.sleep(SETTLE_S)
        t0, f0 = time.monotonic(), self._foreign()
        try:
            if mode.online != "none":
                lat = self._online(mode.online, window)
                result.lat.append(summary(lat))
                result.lat_all.extend(lat)
            else:
                time.sleep(window)
            t1, f1 = time.monotonic(), self._foreign()
            result.foreign.append((f1 - f0) / 1e9 / (t1 - t0))
            if mode.vms:
                tp = [throughput(vm.points, t0 + 0.5, t1) for vm in self.vms[: mode.vms]]
                result.tput.append(sum(tp))
        finally:
            self.stop_resourced()

    # -- reaction time -------------------------------------------------------------------------
    def reaction(self, repeats: int) -> list[tuple[float, float]]:
        """(burst → offline cpuset shrinks, burst end → cpuset whole again) in seconds."""
        from shim.resources.qos import cgroupfs

        cpuset = f"{self.driver.mountpoints['cpuset']}/{self.root}/cpuset.cpus"  # type: ignore[attr-defined]
        full = cgroupfs.read_value("/sys/fs/cgroup/cpuset/cpuset.cpus")
        for fr in self.freezers:
            fr.set(False)
        self.knobs.apply(self.policies["rd_cpuset"])  # type: ignore[arg-type]
        self.start_resourced("cpuset")
        out: list[tuple[float, float]] = []
        try:
            attempts = 0
            while len(out) < repeats and attempts < 3 * repeats:
                attempts += 1
                self._wait_cpuset(cpuset, lambda v: v == full, 30)
                time.sleep(0.5)
                burst = subprocess.Popen([str(self.bins["probe"]), "--cpus", "0-1", "--iters",
                                          str(self.iters // 2), "--period-us", "1100", "--duration", "4"],
                                         stdout=subprocess.DEVNULL, preexec_fn=self.online.preexec())
                t_start = time.monotonic() + 1.0  # the probe starts its units 1 s after exec
                t_shrunk = self._wait_cpuset(cpuset, lambda v: v != full, 10)
                burst.wait(timeout=30)
                t_end = time.monotonic()
                t_back = self._wait_cpuset(cpuset, lambda v: v == full, 30)
                if t_shrunk < t_start:
                    self.reaction_discarded += 1  # the host's other load shrank it before the burst
                    continue
                out.append((t_shrunk - t_start, t_back - t_end))
        finally:
            self.stop_resourced()
        return out

    @staticmethod
    def _wait_cpuset(path: str, ok, timeout: float) -> float:
        from shim.resources.qos import cgroupfs

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok(cgroupfs.read_value(path)):
                return time.monotonic()
            time.sleep(0.005)
        raise RuntimeError(f"{path} did not change within {timeout}s")


def _fmt(v: float) -> str:
    return f"{v:6.2f}" if v == v else "   n/a"


def report(results: dict[Mode, Result]) -> None:
    from bench.probe.stats import median_of, summary

    def med(xs: list[float]) -> float:
        xs = [x for x in xs if x == x]
        return statistics.median(xs) if xs else float("nan")

    off = {m.vms: med(r.tput) for m, r in results.items() if m.online == "none" and m.policy == "noqos"}
    for online in ("probe", "nginx"):
        rows = [(m, r) for m, r in results.items() if m.online == online and r.lat]
        if not rows:
            continue
        bases = [b for _, r in rows for b in r.base]
        print(f"\n{online}: online alone (every paired baseline): p50 {median_of(bases, 'p50'):.3f} ms, "
              f"p99 {median_of(bases, 'p99'):.3f} ms, p99.9 {median_of(bases, 'p99.9'):.3f} ms")
        print(f"  {'mode':<34} {'p50×':>6} {'p99×':>6} {'p99.9×':>6} {'pooled p99×':>11} {'p99 ms':>7} {'alone':>7} "
              f"{'offline×':>8} {'other':>5}  p99× per round")
        for m, r in rows:
            ratio = {k: med([d[k] / b[k] for d, b in zip(r.lat, r.base)]) for k in ("p50", "p99", "p99.9")}
            pooled = summary(r.lat_all)["p99"] / summary(r.base_all)["p99"]
            tput = med(r.tput) / off[m.vms] if m.vms in off else float("nan")
            per_round = " ".join(f"{d['p99'] / b['p99']:.2f}" for d, b in zip(r.lat, r.base))
            print(f"  {m.name:<34} {_fmt(ratio['p50'])} {_fmt(ratio['p99'])} {_fmt(ratio['p99.9'])} {_fmt(pooled):>11} "
                  f"{median_of(r.lat, 'p99'):7.3f} {median_of(r.base, 'p99'):7.3f} {_fmt(tput):>8} "
                  f"{med(r.foreign):5.2f}  {per_round}")
    print(f"\noffline throughput, work units/s (median): alone 1 VM {off.get(1, float('nan')):.0f}, "
          f"alone 2 VMs {off.get(2, float('nan')):.0f}")
    for m, r in results.items():
        if m.online == "none" and m.policy != "noqos" and r.tput:
            print(f"  {m.name:<40} {med(r.tput) / off[m.vms]:.2f}× offline alone  "
                  f"(other {med(r.foreign):.2f} cores)")
    print("  (×: median over rounds of the ratio to the paired online-alone window; pooled: p99 of every "
          "round's samples together over the same for the paired windows;\n   offline×: throughput / offline "
          "alone; other: cores used by processes outside the bench during the window — this host is shared)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench interference")
    ap.add_argument("--quick", action="store_true", help="1 round, 3 s windows, fewer policies")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--window", type=float, default=None)
    ap.add_argument("--only", action="append", default=[], help="run only modes whose name contains this "
                    "(the alone baselines always run)")
    if argv is None:  # `python -m bench interference --quick ...`: the options after the names
        rest = sys.argv[1:]
        while rest and not rest[0].startswith("-"):
            rest = rest[1:]
        argv = rest
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    window = args.window or (3.0 if args.quick else 4.0)
    from bench.probe import missing_tools

    missing = missing_tools() + [t for t in ("nginx", "runc", "containerd", "ctr") if shutil.which(t) is None]
    if os.geteuid() != 0 or missing or not Path("/var/lib/kata-colo/images/current/manifest.json").exists():
        print(f"bench_interference: needs root, the guest image and {missing or 'its tools'}; skipped")
        return
    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="kc-interf-", dir="/tmp"))
    bench = Bench(args, work)
    results: dict[Mode, Result] = {m: Result() for m in modes(args.quick)
                                   if not args.only or "offline alone" in m.name or any(o in m.name for o in args.only)}
    rng = random.Random(1234)
    t_all = time.monotonic()
    try:
        bench.setup()
        for rnd in range(rounds):
            order = list(results)
            rng.shuffle(order)
            for m in order:
                bench.run_mode(m, window, results[m])
            print(f"round {rnd + 1}/{rounds} done ({time.monotonic() - t_all:.0f}s)", flush=True)
        report(results)
        lateness = [float(m.group(1)) for n in bench.loadgen_notes
                    if (m := re.search(r"max ([0-9.]+) us", n))]
        if lateness:
            print(f"load generator send lateness (own error bound): max per window median "
                  f"{statistics.median(lateness):.0f} us, worst {max(lateness):.0f} us over {len(lateness)} windows")
        try:
            react = bench.reaction(2 if args.quick else 3)
        except RuntimeError as exc:
            print(f"\nsuppression reaction: FAILED: {exc} (daemon log: {bench.resourced_log})")
            react = []
    finally:
        bench.teardown()
        shutil.rmtree(work, ignore_errors=True)
    shrink = [a for a, _ in react]
    grow = [b for _, b in react]
    if react:
        print(f"\nsuppression reaction (kata-colo-resourced, cpuset policy, shipped interval and relax delay): "
              f"online burst → offline cpuset shrunk: median {statistics.median(shrink) * 1e3:.0f} ms "
              f"{[f'{x * 1e3:.0f}' for x in shrink]}; burst end → cpuset whole again: median "
              f"{statistics.median(grow) * 1e3:.0f} ms {[f'{x * 1e3:.0f}' for x in grow]}"
              f" ({bench.reaction_discarded} attempts discarded: shrunk by other load before the burst)")
    print(f"total {time.monotonic() - t_all:.0f}s")


if __name__ == "__main__":
    main()

"""The online side of the interference bench: its cgroup, the CPU-duty probe, nginx in a runc
container and the open-loop load generator — all of it placed in the online cgroup.

nginx (Debian nginx-light) runs under runc directly (no containerd needed): the bundle's root is
an empty directory with the host's /usr and /etc bound read-only (Debian is merged-/usr: /bin,
/lib, /lib64, /sbin are symlinks), a private writable /kc for its config, pid and temp files, the
host network namespace (it listens on 127.0.0.1:<port>) and ``linux.cgroupsPath`` = the online
group, so runc puts it there in every hierarchy. It answers ``GET /`` with a small static body.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shim.resources.qos import cgroupfs
from shim.resources.qos.detect import detect_driver
from shim.resources.qos.driver import CgroupDriver

RUNC_ROOT = "/run/kata-colo-bench-runc"
CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETGID", "CAP_SETUID", "CAP_NET_BIND_SERVICE",
        "CAP_KILL"]
NGINX_CONF = """daemon off;
master_process on;
worker_processes {workers};
user nobody nogroup;
pid /kc/nginx.pid;
error_log stderr warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path /kc/body;
  proxy_temp_path /kc/proxy;
  fastcgi_temp_path /kc/fastcgi;
  uwsgi_temp_path /kc/uwsgi;
  scgi_temp_path /kc/scgi;
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{ default_type text/plain; return 200 "kata-colo online\\n"; }}
  }}
}}
"""


class OnlineGroup:
    """A cgroup (cpu, cpuacct, cpuset on v1) the online workloads are started in."""

    def __init__(self, name: str, driver: CgroupDriver | None = None) -> None:
        self.name = name
        self.driver = driver or detect_driver()
        self.driver.create(name)

    def preexec(self) -> Callable[[], None]:
        files = self.driver.attach_files(self.name) if self.driver.version == 1 else (
            os.path.join(self.driver.mountpoint, self.name, "cgroup.procs"),)  # type: ignore[attr-defined]

        def enter() -> None:
            for f in files:
                cgroupfs.write_value(f, os.getpid())
        return enter

    def usage_ns(self) -> int:
        return self.driver.cpu_usage_ns(self.name)

    def remove(self) -> None:
        """Remove the group everywhere, runc's extra hierarchies too (it makes the parents of a
        container's cgroupsPath in every controller it uses, and removes only the leaf)."""
        self.driver.remove_tree(self.name, "")
        for m in cgroupfs.cgroup_mounts():
            top = os.path.join(m.path, self.name)
            for root, dirs, _files in os.walk(top, topdown=False):
                for d in dirs:
                    os.rmdir(os.path.join(root, d))
            if os.path.isdir(top):
                os.rmdir(top)


def calibrate(probe: Path, work_us: int, group: OnlineGroup) -> int:
    out = subprocess.run([str(probe), "--calibrate", str(work_us)], capture_output=True, text=True, check=True,
                         preexec_fn=group.preexec())
    return int(out.stdout.strip())


def run_probe(probe: Path, group: OnlineGroup, cpus: str, iters: int, period_us: int,
              duration: float) -> tuple[list[int], list[int]]:
    """(unit wall times, response times) in ns, every CPU's units together."""
    out = subprocess.run([str(probe), "--cpus", cpus, "--iters", str(iters), "--period-us", str(period_us),
                          "--duration", str(duration)], capture_output=True, text=True, check=True,
                         preexec_fn=group.preexec(), timeout=duration + 30)
    units, resps = [], []
    for line in out.stdout.splitlines():
        _cpu, unit, resp = line.split()
        units.append(int(unit))
        resps.append(int(resp))
    return units, resps


def run_loadgen(loadgen: Path, group: OnlineGroup, url: str, rate: float, duration: float,
                conns: int = 8) -> tuple[list[int], str]:
    """(latencies in ns of the successful requests, the generator's summary line)."""
    out = subprocess.run([str(loadgen), "--url", url, "--rate", str(rate), "--duration", str(duration),
                          "--conns", str(conns)], capture_output=True, text=True, preexec_fn=group.preexec(),
                         timeout=duration + 60)
    lat = [int(line.split()[0]) for line in out.stdout.splitlines() if line.endswith(" 1")]
    if out.returncode != 0 and not lat:
        raise RuntimeError(f"loadgen failed: {out.stderr.strip()}")
    return lat, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""


class Nginx:
    """nginx in a runc container in ``cgroup`` (a path below the hierarchy roots)."""

    def __init__(self, cgroup: str, port: int, workers: int = 2) -> None:
        self.id = f"kc-bench-nginx-{os.getpid()}"
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="kc-nginx-", dir="/run"))
        self.cgroup = cgroup
        self.workers = workers

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _spec(self) -> dict:
        ro = ["rbind", "ro", "nosuid", "nodev"]
        return {
            "ociVersion": "1.0.2",
            "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": "/",
                        "args": ["/usr/sbin/nginx", "-e", "stderr", "-c", "/kc/nginx.conf"],
                        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                        "capabilities": {k: CAPS for k in ("bounding", "effective", "permitted")},
                        "noNewPrivileges": True},
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "kc-bench-nginx",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                {"destination": "/usr", "type": "bind", "source": "/usr", "options": ro},
                {"destination": "/etc", "type": "bind", "source": "/etc", "options": ro},
                {"destination": "/kc", "type": "bind", "source": str(self.dir / "kc"), "options": ["rbind", "rw"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
                      "cgroupsPath": "/" + self.cgroup.strip("/"), "resources": {},
                      "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
                      "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]},
        }

    def start(self, timeout: float = 10.0) -> None:
        rootfs = self.dir / "rootfs"
        for d in ("usr", "etc", "proc", "dev", "kc", "tmp"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            os.symlink(target, rootfs / link)
        kc = self.dir / "kc"
        kc.mkdir()
        os.chmod(kc, 0o777)
        (kc / "nginx.conf").write_text(NGINX_CONF.format(workers=self.workers, port=self.port))
        (self.dir / "config.json").write_text(json.dumps(self._spec()))
        log = open(self.dir / "nginx.log", "wb")
        subprocess.run(["runc", "--root", RUNC_ROOT, "run", "-d", "--bundle", str(self.dir), self.id],
                       stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=True, timeout=30)
        log.close()
        deadline = time.monotonic() + timeout
        import urllib.request

        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    log_text = (self.dir / "nginx.log").read_text()[-2000:]
                    raise RuntimeError(f"nginx did not answer: {log_text}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run(["runc", "--root", RUNC_ROOT, "delete", "-f", self.id], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)

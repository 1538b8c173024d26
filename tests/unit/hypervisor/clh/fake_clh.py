#!/usr/bin/env python3
"""A stand-in for the cloud-hypervisor binary, for tests (there is no CH binary here).

The driver execs this file in place of ``cloud-hypervisor``, so the pid, /proc/<pid>/cmdline,
the vCPU threads (named ``vcpu<N>`` with prctl(PR_SET_NAME), as CH names them) and crash
recovery are real. It accepts only CH's own flags (``--api-socket path=...``, ``-v``,
``--seccomp false``), serves the REST API on the API socket with h11, and:

* checks every request against ``schema/cloud-hypervisor-api-0.3.0.json`` (the upstream openapi
  as JSON Schema): endpoint, method, required body, body schema; answers each call with a body
  that it checks against the same schema (status documented for that endpoint, or 500, CH's
  catch-all for an API error);
* receives the SCM_RIGHTS fds of ``vm.add-net`` and checks they are real taps (``/dev/net/tun``
  attached to an interface) or pipes, as many as ``num_queues / 2`` (CH's rule);
* models the VM state machine of CH's ``vmm/src/lib.rs`` (create → Created, boot → Running,
  pause/resume, shutdown back to Created, delete, resize of vCPU threads / RAM / balloon,
  hotplug with ``0000:00:<slot>.0`` addresses, snapshot files, restore);
* serves the hybrid vsock socket (``CONNECT <port>\\n`` → ``OK <n>\\n``);
* flags two requests in flight at once (CH serves one at a time).

Every request is appended to the JSON-lines journal ``$FAKE_CLH_JOURNAL`` with the fds' kinds,
the status and any protocol violation. ``$FAKE_CLH_SCRIPT`` (a JSON file ``{endpoint: [action,
...]}``) injects failures, consumed one per call: ``{"status": N, "message": "..."}`` answers
that error, ``"drop"`` closes the connection unanswered, ``"truncate"`` sends half an answer,
``"exit"`` kills the process mid-call, ``{"delay": s}`` answers late.
"""
from __future__ import annotations

import argparse
import array
import ctypes
import fcntl
import json
import os
import socket
import stat
import struct
import sys
import threading
import time
from typing import Any

import h11
import jsonschema

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.join(HERE, "schema", "cloud-hypervisor-api-0.3.0.json")
with open(SCHEMA_PATH, encoding="utf-8") as _f:
    SCHEMA = json.load(_f)
PATHS: dict[str, Any] = SCHEMA["x-paths"]
#: what CH's HTTP layer (vmm/src/api/http/mod.rs HttpError::status_code) can answer on any
#: endpoint beyond the ones the openapi documents: bad body/config 400, VM or device unknown 404,
#: duplicate id or path 409, any other API error 500.
HTTP_ERROR_STATUSES = (400, 404, 409, 500)
PR_SET_NAME = 15
TUNGETIFF = 0x800454D2
MAX_FDS = 64


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**schema, "$defs": SCHEMA["$defs"]})


class Journal:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        if not self.path:
            return
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


class Script:
    """Failure injection, one action per call, from the JSON file the test writes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.lock = threading.Lock()

    def next_action(self, endpoint: str) -> Any:
        if not self.path or not os.path.exists(self.path):
            return None
        with self.lock:
            with open(self.path, encoding="utf-8") as f:
                script = json.load(f)
            actions = script.get(endpoint) or []
            if not actions:
                return None
            action = actions.pop(0)
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(script, f)
            os.replace(tmp, self.path)
            return action


def fd_kind(fd: int) -> dict[str, Any]:
    """What a received fd is: a tap (its interface name) or a pipe, else "other"."""
    st = os.fstat(fd)
    target = os.readlink(f"/proc/self/fd/{fd}")
    if stat.S_ISFIFO(st.st_mode):
        return {"kind": "pipe", "target": target}
    if stat.S_ISCHR(st.st_mode) and target == "/dev/net/tun":
        try:
            ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
        except OSError:
            return {"kind": "tun-unattached", "target": target}
        name, flags = struct.unpack("16sH", ifr[:18])
        return {"kind": "tap", "ifname": name.rstrip(b"\0").decode(), "flags": flags}
    return {"kind": "other", "target": target}


class VcpuThread:
    def __init__(self, index: int) -> None:
        self.index = index
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(f"vcpu{self.index}".encode()), 0, 0, 0)
        self.stop.wait()

    def join(self) -> None:
        self.stop.set()
        self.thread.join()


class ApiError(Exception):
    def __init__(self, status: int, *chain: str) -> None:
        super().__init__(status, chain)
        self.status = status
        self.chain = list(chain)


class Vm:
    """CH's VM state machine (vmm/src/lib.rs), as far as the driver uses it."""

    def __init__(self) -> None:
        self.config: dict[str, Any] | None = None
        self.state: str | None = None     # None: not booted (vm.info says Created)
        self.vcpus: list[VcpuThread] = []
        self.devices: dict[str, dict[str, Any]] = {}
        self.ejecting: dict[str, int] = {}
        self.held_fds: dict[str, list[int]] = {}
        self.next_slot = 2
        self.boot_ram = 0
        self.vsock: socket.socket | None = None

    # -- helpers ----------------------------------------------------------------------------

    def _need_config(self) -> dict[str, Any]:
        if self.config is None:
            raise ApiError(404, "Error from API", "The VM is not created")
        return self.config

    def _need_booted(self) -> dict[str, Any]:
        config = self._need_config()
        if self.state is None:
            raise ApiError(405, "Error from API", "The VM is not booted")
        return config

    def _ids(self) -> set[str]:
        config = self.config or {}
        ids = set(self.devices)
        for key in ("disks", "net", "devices"):
            ids |= {d.get("id") for d in config.get(key) or [] if d.get("id")}
        return ids

    def _slot(self, dev_id: str) -> str:
        bdf = f"0000:00:{self.next_slot:02x}.0"
        self.next_slot += 1
        self.devices[dev_id] = {"id": dev_id, "resources": [], "children": [], "pci_bdf": bdf}
        return bdf

    def _set_vcpus(self, n: int) -> None:
        while len(self.vcpus) < n:
            self.vcpus.append(VcpuThread(len(self.vcpus)))
        while len(self.vcpus) > n:
            self.vcpus.pop().join()

    def _memory_actual(self) -> int:
        config = self._need_config()
        mem = config["memory"]
        total = mem["size"] + (mem.get("hotplugged_size") or 0)
        balloon = (config.get("balloon") or {}).get("size", 0) if self.state else 0
        return total - balloon

    # -- endpoints ----------------------------------------------------------------------------

    def ping(self, _body: Any, _fds: list[int]) -> tuple[int, Any]:
        return 200, {"version": "v53.0-fake", "build_version": "fake-clh", "pid": os.getpid(),
                     "features": ["kvm"]}

    def info(self, _body: Any, _fds: list[int]) -> tuple[int, Any]:
        config = self._need_config()
        for dev_id in list(self.ejecting):  # the guest releases an ejected device a bit later
            self.ejecting[dev_id] -= 1
            if self.ejecting[dev_id] <= 0:
                del self.ejecting[dev_id]
                self.devices.pop(dev_id, None)
                for fd in self.held_fds.pop(dev_id, []):
                    os.close(fd)
        return 200, {"config": config, "state": self.state or "Created",
                     "memory_actual_size": self._memory_actual(), "device_tree": self.devices}

    def counters(self, _body: Any, _fds: list[int]) -> tuple[int, Any]:
        self._need_booted()
        return 200, {dev: {"read_bytes": 4096, "write_bytes": 512} for dev in self.devices}

    def create(self, body: Any, _fds: list[int]) -> tuple[int, Any]:
        if self.config is not None:
            raise ApiError(500, "Error from API", "The VM is already created")
        cpus = body.get("cpus") or {"boot_vcpus": 1, "max_vcpus": 1}
        topo = cpus.get("topology")
        if topo and topo["threads_per_core"] * topo["cores_per_die"] * topo["dies_per_package"] \
                * topo["packages"] != cpus["max_vcpus"]:
            raise ApiError(400, "Error from API", "Invalid CPU topology")
        if body.get("memory", {}).get("hotplug_method", "Acpi") not in ("Acpi", "VirtioMem"):
            raise ApiError(400, "Invalid hotplug_method")
        self.config = json.loads(json.dumps(body))
        self.config.setdefault("cpus", cpus)
        self.boot_ram = int(self.config["memory"]["size"]) if "memory" in self.config else 512 << 20
        self.config.setdefault("memory", {"size": self.boot_ram})
        return 204, None

    def boot(self, _body: Any, _fds: list[int]) -> tuple[int, Any]:
        config = self._need_config()
        if self.state is not None:
            raise ApiError(500, "Error from API", "The VM is already booted")
        self._start(config, "Running")
        return 204, None

    def _start(self, config: dict[str, Any], state: str) -> None:
        self._set_vcpus(config["cpus"]["boot_vcpus"])
        serial = config.get("serial") or {}
        if serial.get("mode") == "File":
            with open(serial["file"], "a", encoding="utf-8") as f:
                f.write("fake-clh guest console: booted\n")
        for key in ("disks", "net", "devices"):
            for dev in config.get(key) or []:
                if dev.get("id") and dev["id"] not in self.devices:
                    self._slot(dev["id"])
        vsock = config.get("vsock")
        if vsock:
            self.vsock = serve_hybrid_vsock(vsock["socket"])
        self.state = state

    def pause(self, _body: Any, _fds: list[int]) -> tuple[int, Any]:
        self._need_booted()
        if self.state != "Running":
            raise ApiError(405, "Error from API", f"Cannot pause a VM that is {self.state}")
        self.state = "Paused"
        return 204, None

    def resume(self, _body: Any, _fds: list[int]) -> tuple[int, Any]:
        self._need_booted()
        if self.state != "Paused":
            raise ApiError(405, "Error from API", f"Cannot resume a VM that is {self.state}")
        self.state = "Running"
        return 204, None

    def shutdown(self, _body: Any, _fds: list[int]) -> tuple[int, Any]:
        self._need_booted()
        self._set_vcpus(0)
        if self.vsock is not None:
            self.vsock.close()
            self.vsock = None
        self.state = None
        return 204, None

    def delete(self, body: Any, fds: list[int]) -> tuple[int, Any]:
        if self.config is not None and self.state is not None:
            self.shutdown(body, fds)
        self.config = None
        self.devices.clear()
        return 204, None

    def resize(self, body: Any, _fds: list[int]) -> tuple[int, Any]:
        config = self._need_config()
        cpus, mem = config["cpus"], config["memory"]
        if "desired_vcpus" in body:
            if body["desired_vcpus"] > cpus["max_vcpus"]:
                raise ApiError(500, "Error from API", "Error resizing VM", "Desired vCPUs exceed max")
            cpus["boot_vcpus"] = body["desired_vcpus"]
            if self.state:
                self._set_vcpus(body["desired_vcpus"])
        if "desired_ram" in body:
            desired, limit = body["desired_ram"], mem.get("hotplug_size") or 0
            if mem.get("hotplug_method", "Acpi") == "VirtioMem":
                extra = desired - mem["size"]
                if not 0 <= extra <= limit or extra % (2 << 20):
                    raise ApiError(500, "Error from API", "Error resizing VM", "Invalid virtio-mem size")
                if extra:
                    mem["hotplugged_size"] = extra
                else:
                    mem.pop("hotplugged_size", None)
            elif desired > mem["size"]:  # ACPI: grows only; config.memory.size becomes the total
                if desired - self.boot_ram > limit or (desired - mem["size"]) % (128 << 20):
                    raise ApiError(500, "Error from API", "Error resizing VM", "Invalid ACPI hotplug size")
                mem["size"] = desired
        if "desired_balloon" in body:
            if not config.get("balloon"):
                raise ApiError(500, "Error from API", "No balloon device")
            if body["desired_balloon"] > mem["size"] + (mem.get("hotplugged_size") or 0):
                raise ApiError(500, "Error from API", "Balloon larger than the guest")
            config["balloon"]["size"] = body["desired_balloon"]
        return 204, None

    def _add(self, kind: str, body: dict[str, Any]) -> tuple[int, Any]:
        config = self._need_config()
        dev_id = body.get("id") or f"_{kind}{len(config.get(kind) or [])}"
        if dev_id in self._ids():
            raise ApiError(409, "Error from API", f"Identifier {dev_id} is not unique")
        config.setdefault(kind, []).append({**body, "id": dev_id})
        if self.state is None:
            return 204, None
        return 200, {"id": dev_id, "bdf": self._slot(dev_id)}

    def add_net(self, body: Any, fds: list[int]) -> tuple[int, Any]:
        self._need_config()
        queues = body.get("num_queues", 2)
        if not fds:
            raise ApiError(400, "fake-clh: vm.add-net without fds (it cannot create taps)")
        if len(fds) * 2 != queues:
            raise ApiError(400, "Error from API", f"Number of queues ({queues}) to virtio_net does not "
                                                  f"match the number of FDs ({len(fds) * 2})")
        status, answer = self._add("net", body)
        self.held_fds[body.get("id", "")] = list(fds)
        fds.clear()  # kept open like CH does, closed when the device goes
        return status, answer

    def add_disk(self, body: Any, _fds: list[int]) -> tuple[int, Any]:
        self._need_config()
        if not os.path.exists(body.get("path", "")):
            raise ApiError(500, "Error from API", f"Failed to open disk {body.get('path')!r}")
        return self._add("disks", body)

    def add_device(self, body: Any, _fds: list[int]) -> tuple[int, Any]:
        self._need_config()
        if not body.get("path", "").startswith("/sys/bus/pci/devices/"):
            raise ApiError(400, "Error from API", "VFIO device path must be a PCI sysfs path")
        return self._add("devices", body)

    def remove_device(self, body: Any, _fds: list[int]) -> tuple[int, Any]:
        config = self._need_config()
        dev_id = body.get("id")
        if dev_id not in self._ids():
            raise ApiError(404, "Error from API", f"No device with id {dev_id!r}")
        for key in ("disks", "net", "devices"):
            config[key] = [d for d in config.get(key) or [] if d.get("id") != dev_id] or None
            if config[key] is None:
                del config[key]
        self.ejecting[dev_id] = 2  # gone from the device tree two vm.info calls later
        return 204, None

    def snapshot(self, body: Any, _fds: list[int]) -> tuple[int, Any]:
        config = self._need_booted()
        if self.state != "Paused":
            raise ApiError(500, "Error from API", "Error snapshotting VM", "The VM is not paused")
        directory = body["destination_url"].removeprefix("file://")
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        with open(os.path.join(directory, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"fake": True, "devices": self.devices, "next_slot": self.next_slot}, f)
        open(os.path.join(directory, "memory-ranges"), "wb").close()
        return 204, None

    def restore(self, body: Any, _fds: list[int]) -> tuple[int, Any]:
        if self.config is not None:
            raise ApiError(404, "Error from API", "The VM is already created")
        directory = body["source_url"].removeprefix("file://")
        try:
            with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
            with open(os.path.join(directory, "state.json"), encoding="utf-8") as f:
                saved = json.load(f)
        except OSError as exc:
            raise ApiError(400, "Error from API", f"Cannot restore: {exc}") from None
        self.config = config
        self.boot_ram = int(config["memory"]["size"])
        self.devices, self.next_slot = saved["devices"], saved["next_slot"]
        self._start(config, "Running" if body.get("resume") else "Paused")
        return 204, None

    def shutdown_vmm(self, body: Any, fds: list[int]) -> tuple[int, Any]:
        return 204, None


HANDLERS = {
    "vmm.ping": Vm.ping, "vm.info": Vm.info, "vm.counters": Vm.counters, "vm.create": Vm.create,
    "vm.boot": Vm.boot, "vm.pause": Vm.pause, "vm.resume": Vm.resume, "vm.shutdown": Vm.shutdown,
    "vm.delete": Vm.delete, "vm.resize": Vm.resize, "vm.add-net": Vm.add_net,
    "vm.add-disk": Vm.add_disk, "vm.add-device": Vm.add_device, "vm.remove-device": Vm.remove_device,
    "vm.snapshot": Vm.snapshot, "vm.restore": Vm.restore, "vmm.shutdown": Vm.shutdown_vmm,
}


def serve_hybrid_vsock(path: str) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline(64)
                if line.startswith(b"CONNECT ") and line[8:].strip().isdigit():
                    conn.sendall(b"OK 1073741824\n")

    threading.Thread(target=accept, daemon=True).start()
    return srv


class Server:
    def __init__(self, api_socket: str) -> None:
        self.vm = Vm()
        self.journal = Journal(os.environ.get("FAKE_CLH_JOURNAL"))
        self.script = Script(os.environ.get("FAKE_CLH_SCRIPT"))
        self.busy = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # bound and listening before the path appears: a client that sees it can connect
        self.sock.bind(api_socket + ".tmp")
        self.sock.listen(16)
        os.rename(api_socket + ".tmp", api_socket)

    def run(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self.connection, args=(conn,), daemon=True).start()

    def connection(self, conn: socket.socket) -> None:
        with conn:
            h = h11.Connection(our_role=h11.SERVER)
            fds: list[int] = []
            request: h11.Request | None = None
            body = b""
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    data, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
                    for level, kind, cdata in ancdata:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            fds += array.array("i", cdata[:len(cdata) - len(cdata) % 4])
                    h.receive_data(data)
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    if not self.answer(conn, h, request, body, fds):
                        return
                    for fd in fds:
                        os.close(fd)
                    fds = []
                    if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                        return
                    h.start_next_cycle()
                else:
                    return

    def answer(self, conn: socket.socket, h: h11.Connection, request: h11.Request, body: bytes,
               fds: list[int]) -> bool:
        target = request.target.decode()
        endpoint = target.removeprefix("/api/v1/")
        entry: dict[str, Any] = {"method": request.method.decode(), "endpoint": endpoint,
                                 "fds": [fd_kind(fd) for fd in fds], "violations": []}
        if not self.busy.acquire(blocking=False):
            entry["violations"].append("a second request while one was in flight")
            self.busy.acquire()
        try:
            status, answer = self.dispatch(entry, endpoint, target, request, body, fds)
        except ConnectionAbortedError:
            self.journal.write({**entry, "status": "dropped"})
            return False
        except BrokenPipeError:  # "truncate": half an answer, then the connection closes
            self.journal.write({**entry, "status": "truncated"})
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\"")
            return False
        finally:
            self.busy.release()
        entry["status"] = status
        self.check_answer(entry, endpoint, status, answer)
        self.journal.write(entry)
        payload = json.dumps(answer).encode() if answer is not None else b""
        headers = [("Content-Length", str(len(payload)))] if status != 204 else []
        if payload:
            headers.append(("Content-Type", "application/json"))
        data = h.send(h11.Response(status_code=status, headers=headers)) or b""
        if payload:
            data += h.send(h11.Data(data=payload)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        try:
            conn.sendall(data)
        finally:
            if endpoint == "vmm.shutdown" and status == 204:
                os._exit(0)
        return True

    def dispatch(self, entry: dict[str, Any], endpoint: str, target: str, request: h11.Request,
                 body: bytes, fds: list[int]) -> tuple[int, Any]:
        spec = PATHS.get(endpoint)
        if not target.startswith("/api/v1/") or spec is None:
            entry["violations"].append(f"endpoint {target} is not in the schema")
            return 404, ["Not Found"]
        if request.method.decode() != spec["method"]:
            entry["violations"].append(f"{endpoint} is {spec['method']}, not {request.method.decode()}")
            return 400, ["Bad Request"]
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError as exc:
                entry["violations"].append(f"body is not JSON: {exc}")
                return 400, ["Bad Request", str(exc)]
        entry["body"] = parsed
        if "request" in spec:
            if parsed is None and spec.get("request_required"):
                entry["violations"].append(f"{endpoint} needs a request body")
                return 400, ["Bad Request"]
            errors = [e.message for e in validator(spec["request"]).iter_errors(parsed)] if parsed is not None else []
            if errors:
                entry["violations"] += [f"request: {m}" for m in errors]
                return 400, ["Bad Request"] + errors
        elif parsed is not None:
            entry["violations"].append(f"{endpoint} takes no body")
        bad = [f for f in entry["fds"] if f["kind"] not in ("tap", "pipe")]
        if bad:
            entry["violations"].append(f"fds that are neither taps nor pipes: {bad}")
        if fds and endpoint != "vm.add-net":
            entry["violations"].append(f"{endpoint} was sent fds")
        action = self.script.next_action(endpoint)
        entry["action"] = action
        if action == "drop":
            raise ConnectionAbortedError
        if action == "truncate":
            raise BrokenPipeError
        if action == "exit":
            self.journal.write({**entry, "status": "exit"})
            os._exit(7)
        if isinstance(action, dict) and "delay" in action:
            time.sleep(float(action["delay"]))
        elif isinstance(action, dict) and "status" in action:
            return int(action["status"]), ["Error from API", str(action.get("message", "injected"))]
        try:
            return HANDLERS[endpoint](self.vm, parsed if parsed is not None else {}, fds)
        except ApiError as exc:
            return exc.status, exc.chain

    def check_answer(self, entry: dict[str, Any], endpoint: str, status: int, answer: Any) -> None:
        responses = PATHS.get(endpoint, {}).get("responses", {})
        if endpoint in PATHS and str(status) not in responses and status not in HTTP_ERROR_STATUSES:
            entry["violations"].append(f"fake answered {endpoint} with undocumented status {status}")
        schema = responses.get(str(status))
        if 200 <= status < 300 and schema is not None:
            entry["violations"] += [f"fake answer: {e.message}" for e in validator(schema).iter_errors(answer)]
        elif 200 <= status < 300 and answer is not None:
            entry["violations"].append(f"fake answered {endpoint} {status} with a body")


def main() -> None:
    parser = argparse.ArgumentParser(prog="cloud-hypervisor", allow_abbrev=False)
    parser.add_argument("--api-socket", required=True)
    parser.add_argument("-v", action="count", default=0)
    parser.add_argument("--seccomp", choices=("true", "false", "log"))
    args = parser.parse_args()
    if not args.api_socket.startswith("path="):
        parser.error("--api-socket must be path=<socket>")
    server = Server(args.api_socket.removeprefix("path="))
    server.journal.write({"argv": sys.argv[1:], "pid": os.getpid()})
    print(f"fake-clh: serving {args.api_socket}", flush=True)
    server.run()


if __name__ == "__main__":
    main()

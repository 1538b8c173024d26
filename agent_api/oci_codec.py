"""OCI runtime-spec JSON (``config.json`` as containerd writes it) ↔ kata's protobuf ``grpc.Spec``
carried by CreateContainerRequest.OCI. Shared by both sides of the VM: the host encodes
(:func:`spec_from_oci`), the guest agent decodes (:func:`to_json`).

A JSON key is the protobuf field name with its first letter lower-cased, except the names in
:data:`_JSON_NAMES`. Zero values are omitted when decoding (proto3 has no presence), except the
fields OCI requires (:data:`_ALWAYS`). OCI keys kata's proto has no field for (``process.ioPriority``,
``linux.personality``, ``domainname``, …) are dropped and reported through ``dropped``; a value of
the wrong JSON type raises InvalidArgument. A device cgroup rule without major/minor ("any")
becomes -1, the agent's encoding of Go's nil.
"""
from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from common.errors import InvalidArgument
from proto.kata import oci_pb2

_JSON_NAMES = {
    "Version": "ociVersion",
    "UID": "uid",
    "GID": "gid",
    "OOMScoreAdj": "oomScoreAdj",
    "UIDMappings": "uidMappings",
    "GIDMappings": "gidMappings",
    "CPU": "cpu",
    "Pagesize": "pageSize",
    "errnoret": "errnoRet",
    "L3CacheSchema": "l3CacheSchema",
}
# (message full name, field name) emitted even when zero
_ALWAYS = {
    ("grpc.User", "UID"), ("grpc.User", "GID"),
    ("grpc.LinuxDeviceCgroup", "Allow"),
    ("grpc.LinuxDevice", "Major"), ("grpc.LinuxDevice", "Minor"),
    ("grpc.LinuxIDMapping", "HostID"), ("grpc.LinuxIDMapping", "ContainerID"),
    ("grpc.LinuxIDMapping", "Size"),
    ("grpc.POSIXRlimit", "Hard"), ("grpc.POSIXRlimit", "Soft"),
    ("grpc.LinuxSeccompArg", "Index"), ("grpc.LinuxSeccompArg", "Value"),
}
# messages skipped entirely (host-side features or other platforms)
_SKIP = {("grpc.Spec", "Hooks"), ("grpc.Spec", "Solaris"), ("grpc.Spec", "Windows")}

_INT_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
              FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
              FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64}
_ANY_DEVICE = ("grpc.LinuxDeviceCgroup", ("Major", "Minor"))
_FIELDS_CACHE: dict[str, dict[str, FieldDescriptor]] = {}


def _fields(desc: Descriptor) -> dict[str, FieldDescriptor]:
    cached = _FIELDS_CACHE.get(desc.full_name)
    if cached is None:
        cached = {json_name(fd.name): fd for fd in desc.fields}
        _FIELDS_CACHE[desc.full_name] = cached
    return cached


def _scalar(fd: FieldDescriptor, value: Any, where: str) -> Any:
    if fd.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise InvalidArgument(f"{where}: expected a boolean, got {value!r}")
        return value
    if fd.type in _INT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{where}: expected an integer, got {value!r}")
        return value
    if fd.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise InvalidArgument(f"{where}: expected a string, got {value!r}")
        return value
    raise InvalidArgument(f"{where}: unsupported field type {fd.type}")


def _fill(msg: Message, data: Any, where: str, dropped: list[str]) -> None:
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where or 'spec'}: expected an object, got {type(data).__name__}")
    fields = _fields(msg.DESCRIPTOR)
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        fd = fields.get(key)
        if fd is None:
            dropped.append(path)
            continue
        if value is None:
            continue
        target = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise InvalidArgument(f"{path}: expected an object")
            val_fd = fd.message_type.fields_by_name["value"]
            for k, v in value.items():
                target[str(k)] = _scalar(val_fd, v, f"{path}.{k}")
        elif fd.is_repeated:
            if not isinstance(value, list):
                raise InvalidArgument(f"{path}: expected an array")
            for i, item in enumerate(value):
                if fd.message_type is not None:
                    _fill(target.add(), item, f"{path}[{i}]", dropped)
                else:
                    target.append(_scalar(fd, item, f"{path}[{i}]"))
        elif fd.message_type is not None:
            target.SetInParent()
            _fill(target, value, path, dropped)
        else:
            setattr(msg, fd.name, _scalar(fd, value, path))
    if msg.DESCRIPTOR.full_name == _ANY_DEVICE[0]:
        for name in _ANY_DEVICE[1]:
            if json_name(name) not in data or data[json_name(name)] is None:
                setattr(msg, name, -1)


def spec_from_oci(config: dict[str, Any], dropped: list[str] | None = None) -> oci_pb2.Spec:
    """OCI config.json dict → grpc.Spec. Unknown keys are appended to ``dropped`` if given."""
    spec = oci_pb2.Spec()
    _fill(spec, config, "", dropped if dropped is not None else [])
    return spec


def process_from_oci(process: dict[str, Any], dropped: list[str] | None = None) -> oci_pb2.Process:
    """OCI Process JSON (containerd's exec spec) → grpc.Process."""
    proc = oci_pb2.Process()
    _fill(proc, process, "process", dropped if dropped is not None else [])
    return proc


def resources_from_oci(resources: dict[str, Any],
                       dropped: list[str] | None = None) -> oci_pb2.LinuxResources:
    """OCI LinuxResources JSON (containerd's Update) → grpc.LinuxResources."""
    res = oci_pb2.LinuxResources()
    _fill(res, resources, "resources", dropped if dropped is not None else [])
    return res


def spec_to_oci(spec: Message) -> dict[str, Any]:
    """grpc.Spec (or any of its sub-messages) → OCI JSON dict (no guest adaptation)."""
    return to_json(spec)


def json_name(field: str) -> str:
    return _JSON_NAMES.get(field) or field[:1].lower() + field[1:]


def to_json(msg: Message) -> dict[str, Any]:
    """Generic protobuf → OCI JSON dict walk (see module doc for the naming rules)."""
    out: dict[str, Any] = {}
    full = msg.DESCRIPTOR.full_name
    present = {fd.name: value for fd, value in msg.ListFields()}
    for fd in msg.DESCRIPTOR.fields:
        if (full, fd.name) in _SKIP:
            continue
        name = json_name(fd.name)
        if fd.name not in present:
            if (full, fd.name) in _ALWAYS:
                out[name] = getattr(msg, fd.name)
            continue
        value = present[fd.name]
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            out[name] = dict(value)
        elif fd.is_repeated:
            if fd.message_type is not None:
                out[name] = [to_json(v) for v in value]
            else:
                out[name] = list(value)
        elif fd.message_type is not None:
            out[name] = to_json(value)
        else:
            out[name] = value
    if full == "grpc.LinuxDeviceCgroup":
        # kata encodes "any" major/minor as -1 (Go nil); OCI omits them
        for key in ("major", "minor"):
            if key in out and out[key] < 0:
                del out[key]
    return out

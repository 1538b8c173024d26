"""Host side: OCI runtime-spec JSON (``config.json`` as containerd writes it) ↔ kata's
protobuf ``grpc.Spec`` carried by CreateContainerRequest.OCI.

The mapping is the inverse of the agent's :func:`agent_api.agent.spec.to_json`: a JSON key is
the protobuf field name with its first letter lower-cased, except the names in
``agent.spec._JSON_NAMES``. OCI keys kata's proto has no field for (``process.ioPriority``,
``linux.personality``, ``domainname``, …) are dropped and reported through ``dropped``; a value of
the wrong JSON type raises InvalidArgument. A device cgroup rule without major/minor ("any")
becomes -1, the agent's encoding of Go's nil.
"""
from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from agent_api.agent.spec import json_name, to_json
from proto.kata import oci_pb2
from shim.errors import InvalidArgument

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

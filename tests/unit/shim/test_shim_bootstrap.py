"""argv parsing, runc's socket address convention, group ids, socket reuse, address file."""
from __future__ import annotations

import hashlib
import os

import pytest

from shim import bootstrap
from shim.cli import parse_args


def test_go_flag_style_argv():
    a = parse_args(["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock",
                    "-publish-binary", "/usr/bin/containerd", "-id", "abc", "-debug", "start"])
    assert (a.namespace, a.address, a.publish_binary, a.id, a.debug, a.action) == (
        "k8s.io", "/run/containerd/containerd.sock", "/usr/bin/containerd", "abc", True, "start")
    b = parse_args(["--namespace=ns", "-id=x", "--bundle", "/b", "-debug=false", "delete"])
    assert (b.namespace, b.id, b.bundle, b.debug, b.action) == ("ns", "x", "/b", False, "delete")
    assert parse_args(["-v"]).version


@pytest.mark.parametrize("argv", [["-bogus", "start"], ["-id"]])
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_go_clean_and_join_match_go():
    assert bootstrap.go_join("/run/containerd/containerd.sock", "default", "abc") == \
        "/run/containerd/containerd.sock/default/abc"
    assert bootstrap.go_join("/a//b/", "./c", "../d") == "/a/b/d"
    assert bootstrap.go_join("", "x", "") == "x"
    assert bootstrap.go_join() == ""
    assert bootstrap.go_clean("//a/../..") == "/"
    assert bootstrap.go_clean("a/../..") == ".."


def test_socket_path_is_runcs():
    # runc-v2 (containerd 1.6 runtime/v2/shim/util_unix.go SocketAddress):
    #   d := sha256.Sum256([]byte(filepath.Join(socketPath, ns, id)))
    #   fmt.Sprintf("unix://%s/%x", filepath.Join("/run/containerd", "s"), d)
    # For the stock address/namespace/id below Join gives the plain concatenation, so the
    # expected value is sha256("/run/containerd/containerd.sock/k8s.io/sandbox1").
    joined = b"/run/containerd/containerd.sock/k8s.io/sandbox1"
    expected = "/run/containerd/s/" + hashlib.sha256(joined).hexdigest()
    assert bootstrap.socket_path("/run/containerd/containerd.sock", "k8s.io", "sandbox1") == expected
    # a trailing slash on the address is cleaned by filepath.Join: same socket
    assert bootstrap.socket_path("/run/containerd/containerd.sock/", "k8s.io", "sandbox1") == expected
    assert len(expected) <= bootstrap.SOCKET_PATH_LIMIT


def test_group_id_precedence():
    assert bootstrap.group_id({"annotations": {"io.containerd.runc.v2.group": "g",
                                               "io.kubernetes.cri.sandbox-id": "s"}}, "t") == "g"
    assert bootstrap.group_id({"annotations": {"io.kubernetes.cri.sandbox-id": "s"}}, "t") == "s"
    assert bootstrap.group_id({}, "t") == "t"
    assert bootstrap.group_id(None, "t") == "t"


def test_bind_listen_reuse_and_stale(tmp_path):
    path = str(tmp_path / "s" / "sock")
    sock = bootstrap.bind_or_reuse(path)
    assert sock is not None
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert bootstrap.is_serving(path)
    assert bootstrap.bind_or_reuse(path) is None  # a live server owns it
    sock.close()  # the file stays: stale
    assert os.path.exists(path) and not bootstrap.is_serving(path)
    again = bootstrap.bind_or_reuse(path)
    assert again is not None and bootstrap.is_serving(path)
    again.close()


def test_socket_path_limit(tmp_path):
    with pytest.raises(ValueError):
        bootstrap.bind_or_reuse("/tmp/" + "x" * 120)


def test_write_address_atomic(tmp_path):
    bootstrap.write_address(tmp_path, "unix:///run/containerd/s/abc")
    assert (tmp_path / "address").read_text() == "unix:///run/containerd/s/abc"
    bootstrap.write_address(tmp_path, "unix:///x")
    assert (tmp_path / "address").read_text() == "unix:///x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["address"]

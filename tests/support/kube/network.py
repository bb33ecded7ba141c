"""The harness's network: one Linux bridge per management cluster, the "node network".

- The bridge `nestk<n>` carries 10.<200+n>.0.0/16. Its host-side addresses are the Nodes'
  InternalIPs (10.x.0.1, .2, ...), load-balancer addresses (10.x.128.0/17, one /32 each) and
  Service cluster IPs the harness proxies; every other address of the /16 is a pod IP.
- A pod that really runs gets a network namespace `nestk<n>-<id>` with a veth pair: `eth0`
  inside holding its pod IP (default route via the first node address), the other end on the
  bridge. So the host reaches every pod IP, pods reach each other, and pods reach whatever the
  harness serves on the bridge's addresses.

Everything is made with `ip` (iproute2) and removed by `teardown`, which also finds what a
crashed harness left behind by its names. Nothing here binds a socket.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "nestk"
FIRST_SUBNET = 200
MAX_BRIDGES = 50


class NetworkError(Exception):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _batch(commands: list[str], netns: str | None = None) -> None:
    if not commands:
        return
    where = ["-n", netns] if netns else []
    done = subprocess.run(
        ["ip", *where, "-force", "-batch", "-"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise NetworkError(f"ip -batch: {done.stderr.strip()}")


def links() -> list[str]:
    out = _ip("-o", "link", "show").stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def namespaces() -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@dataclass
class Bridge:
    index: int
    name: str
    subnet: ipaddress.IPv4Network
    node_ips: list[str]
    _next_lb: int = 0
    _next_pod: int = 0
    _pods_in_use: set[str] = field(default_factory=set)
    _extra: set[str] = field(default_factory=set)

    @property
    def gateway(self) -> str:
        return self.node_ips[0]

    def namespace_name(self, pod_id: str) -> str:
        return f"{self.name}-{pod_id}"

    def veth_name(self, pod_id: str) -> str:
        return f"nv{self.index}x{pod_id}"[:15]

    def allocate_pod_ip(self) -> str:
        """The next free pod IP (10.x.1.0 - 10.x.127.255), never one in use."""
        base = int(self.subnet.network_address) + 256
        for _ in range(127 * 256):
            candidate = str(ipaddress.IPv4Address(base + self._next_pod))
            self._next_pod = (self._next_pod + 1) % (127 * 256)
            if candidate not in self._pods_in_use:
                self._pods_in_use.add(candidate)
                return candidate
        raise NetworkError("no pod IP left")

    def reserve_pod_ip(self, ip: str) -> None:
        self._pods_in_use.add(ip)

    def release_pod_ip(self, ip: str) -> None:
        self._pods_in_use.discard(ip)

    def allocate_lb_ip(self, taken: set[str]) -> str:
        base = int(self.subnet.network_address) + 128 * 256
        for _ in range(128 * 256 - 2):
            self._next_lb = (self._next_lb + 1) % (128 * 256 - 2)
            candidate = str(ipaddress.IPv4Address(base + self._next_lb))
            if candidate not in taken:
                return candidate
        raise NetworkError("no load-balancer address left")

    def add_address(self, ip: str) -> None:
        """Give the host an extra /32 on the bridge (a load-balancer or cluster IP)."""
        if ip in self._extra or ip in self.node_ips:
            return
        _ip("addr", "replace", f"{ip}/32", "dev", self.name)
        self._extra.add(ip)

    def remove_address(self, ip: str) -> None:
        if ip in self._extra:
            _ip("addr", "del", f"{ip}/32", "dev", self.name, check=False)
            self._extra.discard(ip)

    def attach(self, pod_id: str, pod_ip: str) -> str:
        """A network namespace for one pod with `pod_ip` on its eth0; returns its name."""
        netns = self.namespace_name(pod_id)
        veth = self.veth_name(pod_id)
        _ip("netns", "add", netns)
        try:
            _batch(
                [
                    f"link add {veth} type veth peer name eth0 netns {netns}",
                    f"link set {veth} master {self.name} up",
                ]
            )
            _batch(
                [
                    f"addr add {pod_ip}/{self.subnet.prefixlen} dev eth0",
                    "link set lo up",
                    "link set eth0 up",
                    f"route add default via {self.gateway}",
                ],
                netns,
            )
        except NetworkError:
            self.detach(pod_id)
            raise
        return netns

    def detach(self, pod_id: str) -> None:
        # Deleting the namespace deletes eth0 and with it its peer on the bridge.
        _ip("netns", "delete", self.namespace_name(pod_id), check=False)
        _ip("link", "delete", self.veth_name(pod_id), check=False)


def owner(bridge_name: str) -> str | None:
    """Who made the bridge (its link alias: the harness directory), None if it is gone."""
    done = _ip("-o", "link", "show", "dev", bridge_name, check=False)
    if done.returncode != 0:
        return None
    words = done.stdout.split()
    return words[words.index("alias") + 1] if "alias" in words else ""


def create_bridge(nodes: int, lock_dir: Path, owner_id: str) -> Bridge:
    """A new bridge with a subnet no other harness on this machine uses (claimed under a lock),
    marked as `owner_id`'s, so that no other harness's clean-up ever removes it."""
    import fcntl

    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / "bridges.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = set(links())
        for index in range(MAX_BRIDGES):
            name = f"{PREFIX}{index}"
            if name in existing:
                continue
            subnet = ipaddress.IPv4Network(f"10.{FIRST_SUBNET + index}.0.0/16")
            node_ips = [str(subnet.network_address + 1 + i) for i in range(nodes)]
            commands = [f"link add {name} type bridge", f"link set {name} alias {owner_id}"]
            commands += [f"addr add {ip}/16 dev {name}" for ip in node_ips[:1]]
            commands += [f"addr add {ip}/32 dev {name}" for ip in node_ips[1:]]
            commands += [f"link set {name} up"]
            _batch(commands)
            return Bridge(index, name, subnet, node_ips)
    raise NetworkError(f"all {MAX_BRIDGES} harness bridges are in use")


def pod_namespaces(bridge_name: str) -> list[str]:
    return [n for n in namespaces() if n.startswith(f"{bridge_name}-")]


def teardown(bridge_name: str, owner_id: str) -> None:
    """Remove a bridge and every pod namespace and veth named after it (also after a crash), if
    it is still `owner_id`'s: the name may have been taken by another harness since."""
    if owner(bridge_name) not in (owner_id, None):
        return
    for netns in namespaces():
        if netns.startswith(f"{bridge_name}-"):
            _ip("netns", "delete", netns, check=False)
    index = bridge_name.removeprefix(PREFIX)
    for link in links():
        if link.startswith(f"nv{index}x"):
            _ip("link", "delete", link, check=False)
    if bridge_name in links():
        _ip("link", "delete", bridge_name, check=False)

"""A management cluster for tests and developers: the real control plane plus the harness's node
agents, run by one long-lived process, described by `<dir>/state.json`.

    python -m tests.support.kube.harness run  --dir D   # in the foreground until SIGTERM
    python -m tests.support.kube.harness up   --dir D   # in the background; prints the kubeconfig
    python -m tests.support.kube.harness down --dir D   # stops it and removes what it made
    python -m tests.support.kube.harness exec --dir D -- CMD...   # CMD seeing the cluster's DNS

`scripts/dev-kube` is `up`/`down`/`exec` with a default directory. The test suite starts one per
test session (`tests.support.kube.session`), shared by every pytest-xdist worker.

Needs root (network namespaces, a bridge, mounts) and the binaries (`scripts/kube-binaries`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.support.kube import binaries, network, pods
from tests.support.kube.agent import Agent, AgentConfig
from tests.support.kube.api import Api
from tests.support.kube.control_plane import ControlPlane

log = logging.getLogger("harness")

STATE = "state.json"
DEFAULT_VERSION = binaries.KUBERNETES_VERSIONS[0]


@dataclass
class State:
    """What `<dir>/state.json` says about a harness; `ready` once the cluster serves."""

    directory: str
    pid: int
    bridge: str = ""
    ready: bool = False
    stopped: bool = False
    error: str = ""
    version: str = ""
    url: str = ""
    etcd_url: str = ""
    kubeconfig: str = ""
    node_names: list[str] = field(default_factory=list)
    node_ips: list[str] = field(default_factory=list)
    hosts: str = ""
    """The cluster's DNS as a hosts file, for processes on the host (`exec`)."""
    process_groups: list[int] = field(default_factory=list)

    def save(self) -> None:
        path = Path(self.directory) / STATE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2))
        temporary.replace(path)

    @classmethod
    def load(cls, directory: Path) -> State | None:
        try:
            return cls(**json.loads((directory / STATE).read_text()))
        except (OSError, ValueError, TypeError):
            return None


def alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie does not (and one that is our own child is reaped here)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def progress(message: str) -> None:
    print(f"harness: {message}", file=sys.stderr, flush=True)


async def serve(
    directory: Path,
    version: str,
    nodes: int,
    mode: str,
    probe_scale: float,
    parent: int | None,
) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(32, thread_name_prefix="harness"))
    directory.mkdir(parents=True, exist_ok=True)
    state = State(directory=str(directory), pid=os.getpid(), version=version)
    state.save()
    bridge = network.create_bridge(nodes, binaries.CACHE_ROOT.parent / "harness", str(directory))
    state.bridge = bridge.name
    state.save()
    plane = ControlPlane(directory, version, advertise_address=bridge.gateway, index=bridge.index)
    agent: Agent | None = None
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await asyncio.to_thread(plane.start, progress)
        state.process_groups = [p.pid for p in plane.processes.values()]
        state.save()
        api = Api.from_kubeconfig(directory / "harness.kubeconfig")
        names = [f"harness-node-{i}" for i in range(nodes)]
        agent = Agent(
            api,
            bridge,
            AgentConfig(
                root=directory,
                nodes=names,
                node_ips=bridge.node_ips,
                default_mode=mode,
                probe_scale=probe_scale,
                kubelet_version=f"v{version}",
                apiserver_port=plane.port,
            ),
        )
        await agent.start()
        await _wait_for_controllers(api)
        state.ready = True
        state.url = plane.url
        state.etcd_url = plane.etcd_url
        state.kubeconfig = str(plane.admin_kubeconfig)
        state.node_names = names
        state.node_ips = bridge.node_ips
        state.hosts = str(directory / "etc" / "hosts")
        state.save()
        progress(
            f"ready: {nodes} nodes, pods {mode} by default; kubeconfig {plane.admin_kubeconfig}"
        )
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
            if parent is not None and not alive(parent):
                progress(f"parent {parent} is gone: stopping")
                break
            if dead := plane.dead():
                progress(f"{', '.join(dead)} exited: stopping")
                state.error = f"{', '.join(dead)} exited"
                break
    except Exception as exc:
        log.exception("harness failed")
        state.error = f"{type(exc).__name__}: {exc}"
        state.save()
    finally:
        progress("stopping")
        if agent is not None:
            await agent.stop()
        await asyncio.to_thread(plane.stop)
        network.teardown(bridge.name, str(directory))
        state.ready = False
        state.stopped = True
        state.save()
        progress("stopped")


async def _wait_for_controllers(api: Api, timeout: float = 60.0) -> None:
    """Until the controller-manager works (the `default` ServiceAccount exists) and every Node
    is Ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        account = await api.get("/api/v1/namespaces/default/serviceaccounts/default")
        nodes = await api.list("/api/v1/nodes")
        ready = all(
            any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
            for n in nodes
        )
        if account is not None and nodes and ready:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the controller-manager created no default ServiceAccount")


def start_background(
    directory: Path,
    *,
    version: str = DEFAULT_VERSION,
    nodes: int = 2,
    mode: str = pods.FAKE,
    probe_scale: float = 1.0,
    parent: int | None = None,
    timeout: float = 1800.0,
    echo: bool = True,
) -> State:
    """Start `run` detached (its own session, output in `<dir>/harness.log`) and wait until it
    is ready; raise RuntimeError with its log if it fails."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE).unlink(missing_ok=True)
    log_path = directory / "harness.log"
    argv = [
        sys.executable,
        "-m",
        "tests.support.kube.harness",
        "run",
        "--dir",
        str(directory),
        "--version",
        version,
        "--nodes",
        str(nodes),
        "--pods",
        mode,
        "--probe-scale",
        str(probe_scale),
    ]
    if parent is not None:
        argv += ["--parent", str(parent)]
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[3],
        )
    deadline = time.monotonic() + timeout
    shown = 0
    while time.monotonic() < deadline:
        if echo:
            lines = log_path.read_text(errors="replace").splitlines()
            for line in lines[shown:]:
                if line.startswith(("harness: ", "built ")) or "building" in line:
                    print(line, file=sys.stderr, flush=True)
            shown = len(lines)
        state = State.load(directory)
        if state is not None and state.ready:
            return state
        if process.poll() is not None or (state is not None and state.stopped):
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
            raise RuntimeError(f"the harness stopped before it was ready:\n{tail}")
        time.sleep(0.2)
    stop_background(directory)
    raise RuntimeError(f"the harness was not ready within {timeout}s (log: {log_path})")


def stop_background(directory: Path, timeout: float = 60.0) -> None:
    """Stop the harness of `directory` and remove whatever it left (processes by their recorded
    process groups and network namespaces, its bridge), also after it crashed."""
    state = State.load(directory)
    if state is None:
        return
    if alive(state.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(state.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(state.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.pid, signal.SIGKILL)
    for group in state.process_groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    if state.bridge and network.owner(state.bridge) in (state.directory, None):
        for netns in network.pod_namespaces(state.bridge):
            pids = subprocess.run(
                ["ip", "netns", "pids", netns], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.killpg(int(pid), signal.SIGKILL)
        network.teardown(state.bridge, state.directory)


def with_cluster_dns(hosts: Path, argv: list[str]) -> list[str]:
    """`argv` run in a private mount namespace whose /etc/hosts is the cluster's DNS (`hosts`,
    rewritten in place by the harness, so later changes are seen): what a process in the
    management cluster resolves, for Nest's services running on the host."""
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(hosts), *argv]


def exec_with_dns(directory: Path, argv: list[str]) -> int:
    state = State.load(directory)
    if state is None or not state.ready:
        print(f"no harness is running in {directory}", file=sys.stderr)
        return 1
    node = state.node_ips[0]
    env = dict(os.environ)
    env.setdefault("NEST_KUBECONFIG", state.kubeconfig)
    env.setdefault("NEST_NODE_ADDRESS", node)
    env.setdefault("NEST_BACKUP_SERVE_HOST", node)
    env.setdefault(
        "NEST_BACKUP_PUBLIC_URL", f"http://{node}:{env.get('NEST_BACKUP_SERVE_PORT', '8091')}"
    )
    return subprocess.call(with_cluster_dns(Path(state.hosts), argv), env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "up"):
        command = sub.add_parser(name)
        command.add_argument("--dir", type=Path, required=True)
        command.add_argument("--version", default=DEFAULT_VERSION)
        command.add_argument("--nodes", type=int, default=2)
        command.add_argument("--pods", choices=(pods.FAKE, pods.REAL), default=pods.FAKE)
        command.add_argument("--probe-scale", type=float, default=1.0)
        command.add_argument("--parent", type=int)
    down = sub.add_parser("down")
    down.add_argument("--dir", type=Path, required=True)
    status = sub.add_parser("status")
    status.add_argument("--dir", type=Path, required=True)
    run_in = sub.add_parser("exec")
    run_in.add_argument("--dir", type=Path, required=True)
    run_in.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "run":
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        logging.getLogger("httpx").setLevel(logging.WARNING)
        asyncio.run(
            serve(args.dir, args.version, args.nodes, args.pods, args.probe_scale, args.parent)
        )
        return 0
    if args.command == "up":
        state = State.load(args.dir)
        if state is not None and state.ready and alive(state.pid):
            print(state.kubeconfig)
            return 0
        stop_background(args.dir)
        try:
            state = start_background(
                args.dir,
                version=args.version,
                nodes=args.nodes,
                mode=args.pods,
                probe_scale=args.probe_scale,
                parent=args.parent,
            )
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(state.kubeconfig)
        return 0
    if args.command == "down":
        stop_background(args.dir)
        return 0
    if args.command == "status":
        state = State.load(args.dir)
        running = state is not None and state.ready and alive(state.pid)
        print(json.dumps(asdict(state), indent=2) if state else "no harness")
        return 0 if running else 1
    argv_ = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return exec_with_dns(args.dir, argv_)


if __name__ == "__main__":
    sys.exit(main())

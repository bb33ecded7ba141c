"""The management cluster's control plane as processes on 127.0.0.1: etcd, kube-apiserver (RBAC
and Node authorizers, service-account signing keys, the default admission plugins),
kube-controller-manager (every default controller plus the bootstrap signer and token cleaner,
CSR signing with the cluster CA) and kube-scheduler — the real binaries of one version.

Each process runs in its own process group with its output in `<dir>/logs/<name>.log`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.kube import binaries, pki


def service_cidr(index: int) -> str:
    """The management cluster's Service range: one per harness, because the harness binds
    every cluster IP on the host (two harnesses must never hand out the same address)."""
    return f"10.{100 + index}.0.0/16"


class ControlPlaneError(Exception):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ControlPlane:
    directory: Path
    version: str
    advertise_address: str
    index: int = 0
    """The harness's bridge index: picks its Service range."""
    certificates: pki.ClusterPki | None = None
    port: int = 0
    etcd_url: str = ""
    """The management etcd's client URL (plain HTTP on 127.0.0.1)."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def service_cidr(self) -> str:
        return service_cidr(self.index)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.directory / "admin.kubeconfig"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        environment = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with (logs / f"{name}.log").open("ab") as out:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.directory / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def start(self, progress: Callable[[str], None] = print) -> None:
        kube = binaries.kubernetes(self.version)
        etcd = binaries.etcd(binaries.ETCD_VERSIONS[0])
        self.certificates = certs = pki.create(
            self.directory / "pki",
            service_ip=str(ipaddress.IPv4Network(self.service_cidr)[1]),
            extra_ips=(self.advertise_address,),
        )
        self.port = free_port()
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        progress(f"starting etcd {etcd.version}")
        self._spawn(
            "etcd",
            [
                str(etcd.etcd),
                "--name=management",
                f"--data-dir={self.directory / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{client_port}",
                f"--advertise-client-urls=http://127.0.0.1:{client_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=management=http://127.0.0.1:{peer_port}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",  # a throwaway test store; fsync only slows the suite
                "--log-level=warn",
            ],
        )
        progress(f"starting kube-apiserver v{self.version}")
        self._spawn(
            "kube-apiserver",
            [
                str(kube.kube_apiserver),
                "--bind-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--advertise-address={self.advertise_address}",
                f"--etcd-servers=http://127.0.0.1:{client_port}",
                f"--client-ca-file={certs.ca.cert}",
                f"--tls-cert-file={certs.apiserver.cert}",
                f"--tls-private-key-file={certs.apiserver.key}",
                f"--kubelet-client-certificate={certs.admin.cert}",
                f"--kubelet-client-key={certs.admin.key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={certs.service_account_pub}",
                f"--service-account-signing-key-file={certs.service_account_key}",
                f"--service-cluster-ip-range={self.service_cidr}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                "--enable-bootstrap-token-auth=true",
                "--profiling=false",
                "--shutdown-delay-duration=0s",
                "--shutdown-send-retry-after=false",
                "--v=1",
            ],
        )
        self._write_kubeconfigs()
        self._wait_ready()
        progress(f"kube-apiserver v{self.version} ready at {self.url}")
        for name, stem, extra in (
            (
                "kube-controller-manager",
                "controller-manager",
                [
                    "--controllers=*,bootstrapsigner,tokencleaner",
                    f"--cluster-signing-cert-file={certs.ca.cert}",
                    f"--cluster-signing-key-file={certs.ca.key}",
                    f"--root-ca-file={certs.ca.cert}",
                    f"--service-account-private-key-file={certs.service_account_key}",
                    "--use-service-account-credentials=true",
                    "--allocate-node-cidrs=false",
                    f"--service-cluster-ip-range={self.service_cidr}",
                    "--leader-elect=false",
                    # A management cluster that hosts many control planes raises the client
                    # rate limits (defaults 20/30), or creating them queues in its controllers.
                    "--kube-api-qps=100",
                    "--kube-api-burst=200",
                ],
            ),
            (
                "kube-scheduler",
                "scheduler",
                ["--leader-elect=false", "--kube-api-qps=100", "--kube-api-burst=200"],
            ),
        ):
            binary = (
                kube.kube_controller_manager
                if stem == "controller-manager"
                else kube.kube_scheduler
            )
            kubeconfig = self.directory / f"{stem}.kubeconfig"
            self._spawn(
                name,
                [
                    str(binary),
                    f"--kubeconfig={kubeconfig}",
                    f"--authentication-kubeconfig={kubeconfig}",
                    f"--authorization-kubeconfig={kubeconfig}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                    "--profiling=false",
                    *extra,
                ],
            )
        progress("kube-controller-manager and kube-scheduler started")

    def _write_kubeconfigs(self) -> None:
        certs = self.certificates
        assert certs is not None
        pki.kubeconfig(
            self.admin_kubeconfig, self.url, certs.ca.cert, user="admin", client=certs.admin
        )
        for stem in ("controller-manager", "scheduler", "harness"):
            pki.kubeconfig(
                self.directory / f"{stem}.kubeconfig",
                self.url,
                certs.ca.cert,
                user=stem,
                client=certs.client(stem),
            )

    def _wait_ready(self, timeout: float = 120.0) -> None:
        certs = self.certificates
        assert certs is not None
        context = ssl.create_default_context(cafile=str(certs.ca.cert))
        context.load_cert_chain(certs.admin.cert, certs.admin.key)
        deadline = time.monotonic() + timeout
        with httpx.Client(verify=context, timeout=2.0) as client:
            while time.monotonic() < deadline:
                for name in ("etcd", "kube-apiserver"):
                    if self.processes[name].poll() is not None:
                        raise ControlPlaneError(f"{name} exited:\n{self.log_tail(name)}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                time.sleep(0.1)
        raise ControlPlaneError(
            f"kube-apiserver not ready in {timeout}s:\n{self.log_tail('kube-apiserver')}"
        )

    def dead(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process (SIGTERM, SIGKILL after `timeout`), scheduler first, etcd last."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

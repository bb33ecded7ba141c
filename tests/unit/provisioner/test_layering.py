"""The provisioner's layers: one module talks to Kubernetes, the domain modules stay pure."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_layering import imports

PACKAGE = Path(__file__).resolve().parents[3] / "services" / "provisioner"
PURE = ("names", "pki", "manifests", "addons", "status")
IO = ("kubernetes_asyncio", "aiohttp", "nats", "httpx", "libs.common.bus")


def top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def test_only_kube_imports_the_kubernetes_client() -> None:
    for path in PACKAGE.glob("*.py"):
        found = {m for m in imports(path) if top(m) in ("kubernetes_asyncio", "kubernetes")}
        if path.stem != "kube":
            assert not found, f"{path.name} imports {found}; go through services.provisioner.kube"


def test_domain_modules_do_no_io() -> None:
    for name in PURE:
        found = imports(PACKAGE / f"{name}.py")
        bad = {m for m in found if top(m) in IO or m in IO or m.endswith((".kube", ".service"))}
        assert not bad, f"{name}.py imports {bad}"

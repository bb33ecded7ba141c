"""Deployment files stay in step with the code: every service runs a command that exists."""

from __future__ import annotations

from pathlib import Path

import yaml

from cli.main import SERVICES

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_only_existing_services_with_health_checks() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    nest_services = {name: s for name, s in services.items() if s.get("image") == "nest:dev"}
    assert "api" in nest_services
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
    for name, service in nest_services.items():
        command = service["command"]
        assert command[0] == "run" and command[1] in SERVICES, f"{name}: {command}"
        for dependency in service["depends_on"].values():
            assert dependency["condition"] == "service_healthy"
        env = service["environment"]
        assert env["NEST_NATS_URL"].startswith("nats://")
        assert env["NEST_DATABASE_URL"].startswith("postgresql://")


def test_the_image_ships_the_etcdutl_of_the_newest_supported_release() -> None:
    """Restore Jobs run `etcdutl` from the Nest image; it must read snapshots of every supported
    etcd, so it comes from the newest release's etcd image."""
    from libs.common.contract.versions import NEWEST_VERSION, release

    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ARG ETCD_IMAGE=registry.k8s.io/etcd:{release(NEWEST_VERSION).etcd}\n" in dockerfile

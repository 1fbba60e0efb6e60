"""The Helm chart: lint, template and schema (scripts/helm_check.sh), and what it renders, read
the way ratelimitd and Kubernetes would read it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ratelimitd import config_file
from tests.servers import ROOT

CHART = ROOT / "deploy" / "helm" / "ratelimitd"
HELM = os.environ.get("HELM") or shutil.which("helm") or str(Path.home() / "go" / "bin" / "helm")
pytestmark = pytest.mark.skipif(
    not Path(HELM).is_file(),
    reason="helm is not installed (.ci/run installs it: go install helm.sh/helm/v3/cmd/helm@v3.19.5)",
)
# The image's environment (Dockerfile ENV), which the Deployment's env then overrides.
IMAGE_ENV = {
    "RATELIMITD_LISTEN": "0.0.0.0:50051",
    "RATELIMITD_METRICS_LISTEN": "0.0.0.0:9464",
    "RATELIMITD_DATA_DIR": "/data",
}


def render(*values: str) -> dict[str, dict[str, Any]]:
    """``helm template`` with these --set values: {kind: resource}."""
    done = subprocess.run(
        [HELM, "template", "rl", str(CHART), *(a for v in values for a in ("--set", v))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {doc["kind"]: doc for doc in yaml.safe_load_all(done.stdout) if doc}


def container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = resources["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def pod_settings(resources: dict[str, dict[str, Any]], tmp_path: Path) -> config_file.Resolved:
    """The settings the pod would run with: its config file under the image's and the pod's environment."""
    path = tmp_path / "ratelimitd.toml"
    path.write_text(resources["ConfigMap"]["data"]["ratelimitd.toml"])
    env = dict(IMAGE_ENV)
    env.update({e["name"]: e["value"] for e in container(resources)["env"]})
    env.update(resources.get("Secret", {}).get("stringData", {}))
    env["RATELIMITD_CONFIG"] = str(path)
    return config_file.resolve(None, env, {})


def test_the_chart_passes_lint_template_and_the_kubernetes_schemas() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "helm_check.sh")],
        capture_output=True, text=True, env={**os.environ, "HELM": HELM}, check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    ok = [line for line in done.stdout.splitlines() if "lint, template and schema" in line]
    assert len(ok) == 4, done.stdout


def test_an_external_storage_url_goes_in_the_secret_and_the_file_is_what_the_pod_runs(tmp_path: Path) -> None:
    resources = render(
        "storage.url=rediss+cluster://:pw@valkey-0.valkey:6379\\,valkey-1.valkey:6379",  # \, : a comma in --set
        "operatorToken.value=rlt_chart-secret",
        "replicaCount=3",
        "config.log_format=json",
        "config.metrics_model_labels=50",
    )
    assert set(resources) == {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
    assert "pw" not in resources["ConfigMap"]["data"]["ratelimitd.toml"]
    assert "rlt_chart-secret" not in resources["ConfigMap"]["data"]["ratelimitd.toml"]
    resolved = pod_settings(resources, tmp_path)
    s = resolved.settings
    assert s.redis_url == "rediss+cluster://:pw@valkey-0.valkey:6379,valkey-1.valkey:6379"
    assert (s.listen, s.metrics_listen, s.log_format, s.metrics_model_labels) == (
        "0.0.0.0:50051", "0.0.0.0:9464", "json", 50,
    )  # fmt: skip
    assert s.operator_token == "rlt_chart-secret"
    assert resolved.sources["listen"].startswith("file ")  # the image's RATELIMITD_LISTEN is cleared
    assert resources["Deployment"]["spec"]["replicas"] == 3


def test_probes_use_grpc_health_for_readiness_and_only_the_port_for_liveness() -> None:
    plain = container(render("storage.url=redis://valkey:6379/0"))
    assert plain["readinessProbe"]["grpc"] == {"port": 50051}
    assert plain["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    tls = container(render("storage.url=redis://valkey:6379/0", "tls.secretName=t", "tls.serverName=rl.internal"))
    assert tls["readinessProbe"]["exec"]["command"] == [
        "ratelimitd", "health", "--address", "127.0.0.1:50051",
        "--tls-ca", "/etc/ratelimitd/tls/ca.crt", "--tls-server-name", "rl.internal",
    ]  # fmt: skip
    mtls = container(render("storage.url=redis://valkey:6379/0", "tls.secretName=t", "tls.clientCA=true"))
    assert "tcpSocket" in mtls["readinessProbe"]


def test_tls_mounts_the_secret_and_the_file_names_its_files(tmp_path: Path) -> None:
    resources = render("storage.url=redis://valkey:6379/0", "tls.secretName=rl-tls", "tls.clientCA=true")
    volumes = {v["name"]: v for v in resources["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"] == {"secretName": "rl-tls"}
    s = pod_settings(resources, tmp_path).settings
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (
        "/etc/ratelimitd/tls/tls.crt", "/etc/ratelimitd/tls/tls.key", "/etc/ratelimitd/tls/ca.crt",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["replicaCount=2"], "replicaCount > 1 needs shared storage"),
        (["storage.url=redis://a:6379", "config.redis_url=redis://b:6379"], "config.redis_url: set it through"),
    ],
)
def test_values_that_cannot_work_are_refused_by_helm(values: list[str], message: str) -> None:
    done = subprocess.run(
        [HELM, "template", "rl", str(CHART), *(a for v in values for a in ("--set", v))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_an_unknown_setting_in_the_values_stops_the_pod_naming_it(tmp_path: Path) -> None:
    resources = render("config.log_fromat=json")
    with pytest.raises(
        config_file.ConfigError, match="unknown setting 'log_fromat' \\(did you mean 'log_format'\\?\\)"
    ):
        pod_settings(resources, tmp_path)

"""deploy/kubernetes/: valid against the Kubernetes API schema, and true to the service it deploys."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from config.settings import load_settings
from tests.helpers import KUBERNETES as MANIFESTS
from tests.helpers import kubernetes_objects, pod_container

VALIDATOR = str(Path(sys.executable).with_name("kubernetes-validate"))
IMAGE_USER = 1034  # BentoML's `bentoml` user in the image (its Dockerfile's BENTO_USER_UID)
SERVICE_PORT = 3000  # `bentoml serve`'s default, which the image's entrypoint uses


def pod(kinds: Mapping[str, dict]) -> dict:
    return kinds["Deployment"]["spec"]["template"]["spec"]


def test_every_manifest_is_valid_against_the_current_kubernetes_schema():
    files = [path for path in sorted(MANIFESTS.glob("*.yaml")) if path.name != "kustomization.yaml"]
    result = subprocess.run([VALIDATOR, "--strict", *map(str, files)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(files), result.stdout


def test_kustomization_lists_every_manifest_and_names_the_image():
    kinds = kubernetes_objects()
    kustomization = kinds["Kustomization"]
    assert sorted(kustomization["resources"]) == sorted(
        path.name for path in MANIFESTS.glob("*.yaml") if path.name != "kustomization.yaml"
    )
    assert [image["name"] for image in kustomization["images"]] == [pod_container(kinds)["image"]]


def test_probes_ports_and_labels_fit_the_service():
    kinds = kubernetes_objects()
    main = pod_container(kinds)
    [port] = main["ports"]
    assert port["containerPort"] == SERVICE_PORT and port["name"] == "http"
    assert main["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"]["port"] == "http"
    # The start-up budget covers a slow start (measured about 15 s): at least two minutes.
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = (
        kinds["Service"]["spec"]["selector"],
        kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        kinds["Deployment"]["spec"]["selector"]["matchLabels"],
    )
    for selector in selectors:
        assert selector.items() <= labels.items()
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    annotations = kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == str(SERVICE_PORT)


def test_in_flight_requests_drain_before_the_pod_is_killed():
    kinds = kubernetes_objects()
    spec, main = pod(kinds), pod_container(kinds)
    pause = int(main["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pause >= 5
    request_timeout_s = load_settings({}).request_timeout_ms / 1000
    assert spec["terminationGracePeriodSeconds"] >= pause + request_timeout_s + 5
    assert kinds["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_env_vars_are_ones_the_service_reads_and_workers_match_the_cpu_limit():
    kinds = kubernetes_objects()
    main = pod_container(kinds)
    read: set[str] = set()

    class Recording(dict):
        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

    load_settings(Recording())
    ours = {item["name"] for item in main["env"] if item["name"].startswith("HISTO_")}
    assert ours and ours <= read, ours - read
    values = {item["name"]: item.get("value") for item in main["env"]}
    assert load_settings({k: v for k, v in values.items() if k.startswith("HISTO_") and v is not None})
    cpu_limit = int(main["resources"]["limits"]["cpu"])
    assert int(values["HISTO_WORKERS"]) == cpu_limit
    token = next(item for item in main["env"] if item["name"] == "HISTO_API_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True  # no Secret: open, as locally


def test_the_pod_is_locked_down():
    kinds = kubernetes_objects()
    spec, main = pod(kinds), pod_container(kinds)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == IMAGE_USER
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {mount["mountPath"]: mount["name"] for mount in main["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert all("emptyDir" in volumes[name] for name in mounts.values())  # writable only where given
    env = {item["name"]: item.get("value") for item in main["env"]}
    assert env["BENTOML_HOME"] in mounts and "/tmp" in mounts


def test_autoscaler_and_disruption_budget_keep_capacity():
    kinds = kubernetes_objects()
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": kinds["Deployment"]["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
    assert kinds["PodDisruptionBudget"]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


@pytest.mark.bento
def test_the_image_user_is_the_one_the_pod_runs_as(bento_tag):
    import bentoml

    dockerfile = (Path(bentoml.bentos.get(bento_tag).path) / "env" / "docker" / "Dockerfile").read_text()
    assert f"ARG BENTO_USER_UID={IMAGE_USER}" in dockerfile and "USER bentoml" in dockerfile
    assert pod(kubernetes_objects())["securityContext"]["runAsUser"] == IMAGE_USER

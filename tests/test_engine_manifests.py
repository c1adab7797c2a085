"""deploy/kubernetes-engine/: the service with a Dask scheduler, slide workers and a shared store, rendered
by kustomize (kubectl's), valid against the Kubernetes API schema, and true to the engine's code."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.settings import load_settings
from loadtests.servers import REPO_ROOT
from slides.cluster import worker_command

ENGINE = REPO_ROOT / "deploy" / "kubernetes-engine"
VALIDATOR = str(Path(sys.executable).with_name("kubernetes-validate"))
IMAGE_USER = 1034  # the image's `bentoml` user, as in tests/test_kubernetes.py


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple[str, str], dict]]:
    """`kubectl kustomize deploy/kubernetes-engine`: the file and (kind, name) -> object."""
    result = subprocess.run(["kubectl", "kustomize", str(ENGINE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("engine-manifests") / "rendered.yaml"
    path.write_text(result.stdout)
    objects = [item for item in yaml.safe_load_all(result.stdout) if item]
    return path, {(item["kind"], item["metadata"]["name"]): item for item in objects}


def spec(objects: dict, name: str) -> dict:
    return objects[("Deployment", name)]["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def test_the_rendered_manifests_are_valid_against_the_current_kubernetes_schema(rendered):
    path, objects = rendered
    result = subprocess.run([VALIDATOR, "--strict", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(objects)


def test_the_service_submits_to_the_scheduler_its_service_names(rendered):
    _, objects = rendered
    scheduler_service = objects[("Service", "histopathology-dask-scheduler")]["spec"]
    [port] = scheduler_service["ports"]
    [scheduler] = spec(objects, "histopathology-dask-scheduler")["containers"]
    assert scheduler_service["selector"].items() <= objects[("Deployment", "histopathology-dask-scheduler")][
        "spec"]["template"]["metadata"]["labels"].items()
    assert [p["containerPort"] for p in scheduler["ports"] if p["name"] == port["targetPort"]] == [port["port"]]
    assert f"--port {port['port']}" in " ".join(scheduler["command"])
    address = f"tcp://histopathology-dask-scheduler:{port['port']}"
    [service] = spec(objects, "histopathology")["containers"]
    assert env_of(service)["HISTO_DASK_SCHEDULER"]["value"] == address
    assert load_settings({"HISTO_DASK_SCHEDULER": address}).dask_scheduler == address
    [worker] = spec(objects, "histopathology-slide-worker")["containers"]
    assert worker["command"][:3] == ["dask", "worker", address]
    # The same worker flags as `make engine` (slides.cluster), nice aside: a pod of its own.
    assert set(worker_command(address, "w", 0)[2:]) - {"--name", "w"} <= set(worker["command"])
    assert objects[("Deployment", "histopathology-dask-scheduler")]["spec"]["replicas"] == 1


def test_every_pod_runs_the_one_image_and_shares_one_read_write_many_store(rendered):
    _, objects = rendered
    deployments = [name for kind, name in objects if kind == "Deployment"]
    images = {container["image"] for name in deployments for container in spec(objects, name)["containers"]}
    assert len(images) == 1 and len(deployments) == 3
    claim = objects[("PersistentVolumeClaim", "histopathology-slides")]["spec"]
    assert claim["accessModes"] == ["ReadWriteMany"]
    [service] = spec(objects, "histopathology")["containers"]
    [worker] = spec(objects, "histopathology-slide-worker")["containers"]
    store = env_of(service)["HISTO_SLIDE_STORE"]["value"]
    for name, container in (("histopathology", service), ("histopathology-slide-worker", worker)):
        volumes = {volume["name"]: volume for volume in spec(objects, name)["volumes"]}
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == store]
        assert volumes[mount["name"]] == {"name": mount["name"],
                                          "persistentVolumeClaim": {"claimName": "histopathology-slides"}}
        s3 = {key: env_of(container)[key]["valueFrom"]["secretKeyRef"] for key in
              ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FSSPEC_S3_ENDPOINT_URL")}
        assert all(ref["optional"] is True and ref["name"] == "histopathology-s3" for ref in s3.values())


def test_workers_are_sized_for_one_tensorflow_thread_and_autoscaled_on_cpu(rendered):
    _, objects = rendered
    [worker] = spec(objects, "histopathology-slide-worker")["containers"]
    command = worker["command"]
    assert command[command.index("--nthreads") + 1] == "1"
    assert worker["resources"]["limits"]["cpu"] == "1" == worker["resources"]["requests"]["cpu"]
    memory = worker["resources"]["requests"]["memory"]
    assert memory.endswith("Gi") and float(memory[:-2]) >= 1  # the model and TensorFlow: about 545 MB
    env = {name: item.get("value") for name, item in env_of(worker).items()}
    settings = load_settings({k: v for k, v in env.items() if k.startswith("HISTO_") and v is not None})
    assert settings.dask_worker_nice == 0 and settings.tf_intra_op_threads == 1
    assert env["PYTHONPATH"] and env["BENTOML_HOME"]
    hpa = objects[("HorizontalPodAutoscaler", "histopathology-slide-worker")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "histopathology-slide-worker"}
    [metric] = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and hpa["maxReplicas"] > hpa["minReplicas"] >= 1


def test_the_new_pods_are_locked_down_as_the_service_is(rendered):
    _, objects = rendered
    for name in ("histopathology-dask-scheduler", "histopathology-slide-worker"):
        pod = spec(objects, name)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == IMAGE_USER
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        [container] = pod["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "/tmp" in {mount["mountPath"] for mount in container["volumeMounts"]}
        assert shlex.join(container["command"]).startswith("dask ")

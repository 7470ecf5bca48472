"""deploy/serve.yaml and deploy/kuberay/rayservice.yaml, checked without a cluster.

No package on PyPI ships KubeRay's RayService CRD (its openAPIV3Schema), and the project does not
keep a copy of it, so the manifest is checked against the fields KubeRay documents for ray.io/v1
RayService: spec.serveConfigV2 (a string holding a Serve config, validated here by Ray's own
ServeDeploySchema, whose import path must build this repo's application) and
spec.rayClusterConfig (rayVersion, headGroupSpec and workerGroupSpecs with string-valued
rayStartParams and pod templates). A field KubeRay renamed or dropped would pass here."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.serve._private.utils import import_attr  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from server.ray_serve import build_app  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _application(config: dict):
    """The one application of a Serve config, after Ray's schema validated the whole config."""
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert import_attr(app.import_path) is build_app
    assert isinstance(build_app(app.args), serve.Application)  # its options parse as engram-serve's
    return app


def test_the_serve_config_builds_this_repos_application_with_autoscaling():
    app = _application(yaml.safe_load((DEPLOY / "serve.yaml").read_text()))
    (deployment,) = app.deployments
    assert deployment.name == "engram"
    assert deployment.autoscaling_config["min_replicas"] < deployment.autoscaling_config["max_replicas"]


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())


def test_the_rayservice_serves_the_same_application(rayservice):
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    assert rayservice["metadata"]["name"]
    assert isinstance(rayservice["spec"]["serveConfigV2"], str)  # KubeRay takes the config as a string
    app = _application(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    local = _application(yaml.safe_load((DEPLOY / "serve.yaml").read_text()))
    assert (app.name, app.import_path, [d.name for d in app.deployments]) == \
        (local.name, local.import_path, [d.name for d in local.deployments])


def _pod(group: dict) -> dict:
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in group["rayStartParams"].items())
    spec = group["template"]["spec"]
    assert spec["containers"] and all(c["name"] and c["image"] for c in spec["containers"])
    return spec


def test_the_ray_cluster_has_a_head_and_worker_nodes_sharing_a_memory_dev_shm(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray must be the cluster's
    head = _pod(cluster["headGroupSpec"])
    assert head["containers"][0]["ports"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["groupName"]
    assert 1 <= workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    worker = _pod(workers)
    dshm = [v for v in worker["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    mounts = {m["name"]: m["mountPath"] for m in worker["containers"][0]["volumeMounts"]}
    assert [mounts[v["name"]] for v in dshm] == ["/dev/shm"]
    assert workers["rayStartParams"]["metrics-export-port"] == cluster["headGroupSpec"]["rayStartParams"][
        "metrics-export-port"]

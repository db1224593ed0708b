"""Training as a service, end to end on a local ``ray start --head`` cluster (integration tier, one test).

The Serve app takes a real multipart upload of the demo photos; the training runs as a Ray job
(Jobs API, token auth on) on the same cluster; the ingress replica is killed mid-training and its
replacement still answers; the training is polled to ``succeeded``; then ``POST /v1/generate``
returns a PNG of the new subject from the same, never redeployed, app. The upload asks for
``prior.mode: model`` (an allowed override), so it trains with prior preservation and no prior stage.
"""

from __future__ import annotations

import io
import json
import sys
import time

import pytest
import yaml
from PIL import Image

from raydb.cluster import free_port
from raydb.serving.auth import hash_key
from tests.helpers.head_cluster import head_cluster, job_info, run_job
from tests.helpers.images import demo_photos

KEY = "service-test-key-one"
DEPLOY = "import sys; from raydb.config import load_config; from raydb.serving import deploy; " \
         "deploy(load_config(sys.argv[1]))"
KILL_INGRESS = (
    "import ray; ray.init(); "
    "names = [a for a in ray.util.list_named_actors(all_namespaces=True) if 'RaydbIngress' in a['name']]; "
    "assert len(names) == 1, names; "
    "ray.kill(ray.get_actor(names[0]['name'], namespace=names[0]['namespace']), no_restart=False)")


def _get(client, url: str, deadline: float):
    """GET that rides out the moments when the ingress replica is being replaced."""
    import httpx

    while True:
        try:
            resp = client.get(url, headers={"Authorization": f"Bearer {KEY}"})
            if resp.status_code < 500:
                return resp
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"GET {url} did not answer"
        time.sleep(1)


@pytest.mark.ray
def test_upload_train_as_a_ray_job_then_generate_without_redeploy(tmp_path):
    import httpx

    deadline = time.monotonic() + 600  # generous: the 2 shared cores are often overloaded
    with head_cluster(prefix="rst-") as cluster:
        port = free_port()
        config = tmp_path / "serve.yaml"
        config.write_text(yaml.safe_dump({
            "workspace": str(tmp_path / "ws"),
            "model": {"pretrained": "tiny", "cache_dir": str(tmp_path / "m")},
            "train": {"resolution": 64, "max_steps": 3, "learning_rate": 1e-2, "checkpoint_every": 1000,
                      "num_sample_images": 0},
            "cluster": {"num_workers": 1, "use_gpu": False},
            "serve": {"api_keys": {hash_key(KEY): "t1"}, "port": port, "max_size": 128,
                      "max_inference_steps": 4, "default_inference_steps": 2, "num_cpus_per_replica": 1},
            "service": {"poll_interval_s": 1.0},
        }))
        # Serve's apps outlive the job that deployed them
        run_job(cluster, [sys.executable, "-c", DEPLOY, str(config)], "deploy-serve", deadline)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        files = [("photos", (name, data, "image/jpeg")) for name, data in demo_photos(4, 128, "JPEG")]
        resp = client.post("/v1/trainings", headers={"Authorization": f"Bearer {KEY}"}, files=files,
                           data={"subject_id": "star", "instance_prompt": "a photo of sks toy",
                                 "class_prompt": "a photo of a toy",
                                 "overrides": json.dumps({"prior.mode": "model"})})
        assert resp.status_code == 202, resp.text
        tid = resp.json()["id"]
        assert resp.json()["status"] in ("queued", "running")  # queued while the job agent starts

        # Serve replaces the replica; the new one answers from the workspace
        run_job(cluster, [sys.executable, "-c", KILL_INGRESS], "kill-ingress", deadline)
        while True:
            view = _get(client, f"/v1/trainings/{tid}", deadline).json()
            if view["status"] in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, f"training still {view}"
            time.sleep(2)
        assert view["status"] == "succeeded", view
        assert view["subject"] == {"subject_id": "star", "version": "v0001"}
        assert (view["step"], view["max_steps"]) == (3, 3) and view["loss"] > 0
        png = client.post("/v1/generate", headers={"Authorization": f"Bearer {KEY}", "Accept": "image/png"},
                          json={"subject_id": "star", "prompt": "a toy on a beach", "seed": 1,
                                "num_inference_steps": 2, "width": 64, "height": 64})
        assert png.status_code == 200, png.text
        assert png.headers["X-Raydb-Adapter-Version"] == "v0001"
        assert Image.open(io.BytesIO(png.content)).size == (64, 64)
        client.close()
        ws = tmp_path / "ws"
        home = ws / "tenants" / "t1"  # subject ids are per tenant
        meta = json.loads((home / "subjects" / "star" / "v0001" / "adapter.json").read_text())
        assert meta["training"]["prior_mode"] == "model" and meta["training"]["prior_enabled"]
        assert not (ws / "priors").exists()  # no class image was generated
        manifests = home / "pipeline" / "star"
        assert not (manifests / "prior.json").exists()  # the stage was off: no manifest
        assert json.loads((manifests / "encode.json").read_text())["outputs"]["num_class"] == 0

        # the Jobs API knows the job (its driver may take a moment to exit after the result is written)
        while (job := job_info(cluster.dashboard, view["job_id"], cluster.token)).get("status") == "RUNNING":
            assert time.monotonic() < deadline, job
            time.sleep(1)
        assert job["status"] == "SUCCEEDED" and "raydb.trainings.job" in job["entrypoint"]

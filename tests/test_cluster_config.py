"""cluster.yaml is a launcher config Ray accepts, and the deployment files agree with it.

Checked offline, with no cloud credentials:

- Ray's own launcher validation: ``validate_config`` (the JSON schema ``ray/autoscaler/ray-schema.json``
  plus its cross-field rules) on the file and again after ``prepare_config`` (AWS defaults merged,
  setup commands merged, per-type worker limits filled);
- every node type's ``node_config`` against botocore's EC2 ``RunInstances`` model, which is what the
  AWS provider passes it to (unknown keys and wrong types fail here, not at ``ray up``);
- the launcher's whole AWS bootstrap (``_bootstrap_config``: IAM profile lookup, key pair, subnets,
  security group, resource detection from the instance type catalog) against moto's in-process AWS;
- our own requirements: token auth in every start command and the token reaching every node, GPU
  workers that scale from zero and advertise ``GPU``, a head without GPUs, setup that installs this
  project (CUDA torch on workers, CPU torch on the head), instance profiles set.

Not checked here: that the AMI's SSM parameter resolves, that the IAM profiles exist with the right
policies, instance quotas and zone capacity, and that the setup commands succeed on a real node.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from raydb.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
AWS_CONFIG = REPO / "jobs" / "configs" / "sd15-aws.yaml"
KUBERAY = REPO / "deploy" / "kuberay"
IMAGE_ROOT = "/home/ray/raydb/"  # where deploy/kuberay/Dockerfile puts the checkout


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(cluster) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(cluster))


def _head(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["available_node_types"][cfg["head_node_type"]]


def _workers(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: nt for name, nt in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


# --- Ray's launcher validation ------------------------------------------------------------------


def test_valid_against_launcher_schema(cluster, prepared) -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(cluster)
    validate_config(prepared)  # what `ray up` validates, after defaults are merged
    assert prepared["provider"]["type"] == "aws"


def test_schema_check_is_real(cluster) -> None:
    """The validation above rejects a broken config (so passing it means something)."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["head"]["resourcez"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_node_configs_are_valid_run_instances_parameters(prepared) -> None:
    import botocore.session
    from botocore.exceptions import ParamValidationError
    from botocore.validate import validate_parameters

    ec2 = botocore.session.get_session().get_service_model("ec2")
    shape = ec2.operation_model("RunInstances").input_shape
    for node_type in prepared["available_node_types"].values():
        validate_parameters({**node_type["node_config"], "MinCount": 1, "MaxCount": 1}, shape)
    with pytest.raises(ParamValidationError):
        validate_parameters({"InstanceTyp": "g5.2xlarge", "MinCount": 1, "MaxCount": 1}, shape)


def test_launcher_bootstrap_against_mocked_aws(cluster, tmp_path) -> None:
    """Run the launcher's AWS bootstrap (what `ray up` does before launching anything) on moto."""
    import boto3
    from moto import mock_aws
    from ray.autoscaler._private.aws import utils as aws_utils
    from ray.autoscaler._private.aws.node_provider import list_ec2_instances
    from ray.autoscaler._private.commands import _bootstrap_config

    with pytest.MonkeyPatch.context() as mp, mock_aws():
        mp.setenv("HOME", str(tmp_path))  # the launcher writes its key here
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": cluster["provider"]["region"],
                           "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}.items():
            mp.setenv(key, value)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        aws_utils.resource_cache.cache_clear()
        aws_utils.client_cache.cache_clear()
        try:
            iam = boto3.client("iam", region_name=cluster["provider"]["region"])
            # The profiles must exist (the launcher looks the head's up); ours are created by hand.
            for name in {nt["node_config"]["IamInstanceProfile"]["Name"]
                         for nt in cluster["available_node_types"].values()}:
                iam.create_instance_profile(InstanceProfileName=name)
            resolved = _bootstrap_config(copy.deepcopy(cluster), no_config_cache=True)
            catalog = {t["InstanceType"]: t for t in list_ec2_instances(cluster["provider"]["region"], None)}
        finally:
            aws_utils.resource_cache.cache_clear()
            aws_utils.client_cache.cache_clear()

    for name, node_type in resolved["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["SubnetIds"] and node_config["SecurityGroupIds"], name
        # Our profiles are used as given, not replaced by the launcher's default.
        assert node_config["IamInstanceProfile"] == cluster["available_node_types"][name]["node_config"][
            "IamInstanceProfile"]
    # The stated resources match the instance types (moto's copy of the EC2 catalog): workers offer
    # all their vCPUs and GPUs, the head at most its vCPUs and no GPU.
    for name, node_type in cluster["available_node_types"].items():
        info = catalog[node_type["node_config"]["InstanceType"]]
        gpus = sum(g["Count"] for g in info.get("GpuInfo", {}).get("Gpus", []))
        stated = node_type["resources"]
        if name == cluster["head_node_type"]:
            assert stated["CPU"] <= info["VCpuInfo"]["DefaultVCpus"] and gpus == stated["GPU"] == 0
        else:
            assert (stated["CPU"], stated["GPU"]) == (info["VCpuInfo"]["DefaultVCpus"], gpus), name
    assert resolved["auth"]["ssh_user"] == "ubuntu"


# --- Our requirements ---------------------------------------------------------------------------


def test_token_auth_on_every_ray_start(prepared) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            assert re.search(r"\bRAY_AUTH_MODE=token\b", command), command


def test_token_created_on_head_and_synced_to_workers(prepared) -> None:
    head_setup = " && ".join(prepared["head_setup_commands"])
    assert "ray get-auth-token --generate" in head_setup
    assert "chmod 600 ~/.ray/auth_token" in head_setup
    # `ray start` reads ~/.ray/auth_token; the launcher copies it head -> worker before worker setup.
    assert "~/.ray/auth_token" in prepared["cluster_synced_files"]
    # Not generated on workers: a second token would lock them out of the head.
    assert "get-auth-token" not in " ".join(prepared["worker_setup_commands"])


def test_gpu_workers_autoscale_from_zero_and_advertise_gpu(prepared) -> None:
    workers = _workers(prepared)
    assert workers
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert 1 <= node_type["max_workers"] <= prepared["max_workers"], name
        assert node_type["resources"]["GPU"] >= 1, name
        assert node_type["resources"]["CPU"] >= 1, name


def test_head_has_no_gpu(prepared) -> None:
    head = _head(prepared)
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))


def test_every_node_has_an_instance_profile(prepared) -> None:
    for name, node_type in prepared["available_node_types"].items():
        profile = node_type["node_config"]["IamInstanceProfile"]
        assert profile.get("Name") or profile.get("Arn"), name


def test_setup_installs_this_project(prepared) -> None:
    # The working tree is synced to ~/raydb and installed from there on every node.
    assert prepared["file_mounts"].get("~/raydb") == "."
    assert ".gitignore" in prepared["rsync_filter"]  # no .venv / workspace in the sync
    head_setup = prepared["head_setup_commands"]
    worker_setup = prepared["worker_setup_commands"]
    for commands in (head_setup, worker_setup):  # the lock exactly, then this project resolving nothing
        assert any(re.search(r"pip install .*--no-deps -e ~/raydb\b", c) for c in commands), commands
        assert any(re.search(r"--no-deps --require-hashes -r ~/raydb/requirements/runtime\.lock$", c)
                   for c in commands), commands
        assert any(c.startswith("uv pip check") for c in commands), commands
    # torch's dependencies at the lock's versions: the CPU build's are in the lock, the CUDA build's
    # CUDA libraries are resolved by uv, held to the lock (-c)
    assert all("--no-deps" in c for c in head_setup if "torch==" in c)
    assert all("-c ~/raydb/requirements/runtime.lock" in c for c in worker_setup if "torch==" in c)
    # the lock pins the Ray that launches the cluster and runs the KubeRay manifests
    assert _locked_version("ray") == "2.60.0"
    torch_head = [c for c in head_setup if "torch==" in c]
    torch_workers = [c for c in worker_setup if "torch==" in c]
    assert torch_head and "/whl/cpu" in torch_head[0]
    assert torch_workers and "/whl/cpu" not in torch_workers[0]  # PyPI's Linux wheel is the CUDA build
    assert torch_head[0].split("torch==")[1].split()[0] == torch_workers[0].split("torch==")[1].split()[0]


def test_cluster_fits_the_aws_config(prepared) -> None:
    cfg = load_config(AWS_CONFIG)
    gpu_slots = sum(nt["max_workers"] * nt["resources"]["GPU"] for nt in _workers(prepared).values())
    assert cfg.cluster.use_gpu is True
    assert cfg.cluster.num_workers + cfg.serve.num_replicas * cfg.serve.num_gpus_per_replica <= gpu_slots
    worker_cpus = min(nt["resources"]["CPU"] for nt in _workers(prepared).values())
    assert cfg.cluster.cpus_per_worker <= worker_cpus
    assert cfg.model.pretrained != "tiny" and cfg.train.mixed_precision in ("fp16", "bf16")
    assert cfg.workspace.startswith("s3://")


# --- KubeRay manifests --------------------------------------------------------------------------


def _manifest(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    assert len(docs) == 1, name
    return docs[0]


def _check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for template in [head["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        assert template["spec"]["serviceAccountName"] == "raydb"  # S3 through IRSA / Pod Identity


def test_rayjob_manifest() -> None:
    job = _manifest("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"] == "python jobs/pipeline.py --config jobs/configs/sd15-aws.yaml"
    assert (REPO / "jobs" / "pipeline.py").is_file()
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == IMAGE_ROOT.rstrip("/")
    spec = job["spec"]["rayClusterSpec"]
    _check_ray_cluster_spec(spec)
    (gpu_group,) = spec["workerGroupSpecs"]
    assert gpu_group["minReplicas"] == 0
    assert gpu_group["maxReplicas"] == load_config(AWS_CONFIG).cluster.num_workers


def test_rayservice_manifest() -> None:
    service = _manifest("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    _check_ray_cluster_spec(service["spec"]["rayClusterConfig"])
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "raydb.serving.app:build_app"  # in the installed package
    from raydb.serving.app import build_app

    assert callable(build_app)
    config_path = app["args"]["config"]
    assert config_path.startswith(IMAGE_ROOT)
    cfg = load_config(REPO / config_path[len(IMAGE_ROOT):])
    diffusion = next(d for d in app["deployments"] if d["name"] == "RaydbDiffusion")
    assert diffusion["ray_actor_options"]["num_gpus"] == cfg.serve.num_gpus_per_replica


def _locked_version(name: str) -> str:
    text = (REPO / "requirements" / "runtime.lock").read_text()
    match = re.search(rf"^{re.escape(name)}==(\S+)", text, re.M)
    assert match, f"{name} is not in requirements/runtime.lock"
    return match.group(1)


def test_dockerfile_installs_what_the_manifests_use() -> None:
    text = (KUBERAY / "Dockerfile").read_text()
    assert "--no-deps --require-hashes -r requirements/runtime.lock" in text
    assert "torch==2.13.0 -c requirements/runtime.lock" in text
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-gpu$", text, re.M)
    assert f"WORKDIR {IMAGE_ROOT.rstrip('/')}" in text
    assert "PYTHONPATH" not in text  # the Serve builder is in the installed package
    for manifest in ("rayjob.yaml", "rayservice.yaml"):
        assert "image: YOUR-REGISTRY/raydb:0.1.0" in (KUBERAY / manifest).read_text()

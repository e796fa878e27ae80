"""The container and Kubernetes files, checked as far as this machine allows (no cluster, no registry, no
KubeRay CRD schemas in any package here): the Dockerfile passes hadolint; every manifest parses and has the
shape KubeRay's RayJob/RayService and Kubernetes' Indexed Job need; the commands they run are parsed by
the real parsers (DeepSpeed's launcher, our config loaders) and the Serve config by Ray's own schema."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from infra.k8s import rayservice
from mmdiff.configuration import load_config, parse_overrides
from pipeline.config import PreprocessConfig
from pipeline.stages import model_steps
from train.config import load_train_config
from train.export import locked_versions

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "infra" / "k8s"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind(name: str, kind: str) -> dict:
    (doc,) = [d for d in documents(name) if d["kind"] == kind]
    return doc


def pod_specs(doc: dict) -> list[dict]:
    """Every pod template in a Job, Deployment, RayJob or RayService."""
    spec = doc["spec"]
    if doc["kind"] in ("Job", "Deployment"):
        return [spec["template"]["spec"]]
    cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_the_lock_and_the_wheel_as_a_non_root_user_without_weights():
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert "ARG CUDA_BASE=nvidia/cuda:13.0.2-base-ubuntu24.04" in lines  # torch 2.14.1's wheel is CUDA 13.0
    assert locked_versions(REPO / "requirements" / "runtime.lock")["nvidia-cuda-runtime"].startswith("13.0.")
    assert "wget" in text  # KubeRay probes Ray pods with it
    # the runtime lock and the wheel only: tests/test_packaging_deps.py checks the install lines in detail
    assert "python3.11" in text and "-r /tmp/runtime.lock" in text and "pip install --no-deps /dist/mmdiff-" in text
    assert [line for line in lines if line.startswith("USER")][-1] == "USER 1000:1000"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "outputs", "tests"} <= set(ignored)
    # nothing that looks like weights is copied in
    copies = [line for line in lines if line.startswith("COPY")]
    assert not [c for c in copies if any(ext in c for ext in (".safetensors", ".pth", ".bin", ".onnx", "/models"))]


STEPS = {"mlflow": {"Service", "Deployment"}, "data": {"RayJob"}, "train": {"Service", "Job"}, "serve": {"RayService"}}
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "components", "namespace", "images"}


def check_pod_spec(spec: dict, where: str) -> None:
    """Every container (init containers too) uses the image, mounts only declared volumes, and has
    requests == limits (GPUs require it)."""
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for container in spec.get("initContainers", []) + spec["containers"]:
        assert container["name"] and container["image"] == "mmdiff", (where, container)
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        assert mounts <= volumes, (where, container["name"], mounts - volumes)
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], (where, container["name"])


def test_every_manifest_parses_and_belongs_to_one_step():
    top = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert top["resources"] == list(STEPS)  # the order the README gives; the gates enforce it anyway
    listed = []
    for step, kinds in STEPS.items():
        kustomization = yaml.safe_load((K8S / step / "kustomization.yaml").read_text())
        assert set(kustomization) <= KUSTOMIZE_KEYS and kustomization["components"] == ["../common"], step
        listed += [f"{step}/{name}" for name in kustomization["resources"]]
        docs = [d for name in kustomization["resources"] for d in documents(f"{step}/{name}")]
        assert {d["kind"] for d in docs} == kinds, step
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], step
            for spec in pod_specs(doc) if doc["kind"] in ("Job", "Deployment", "RayJob", "RayService") else []:
                check_pod_spec(spec, step)
    assert sorted(listed) == sorted(str(p.relative_to(K8S)) for p in K8S.glob("*/*.yaml") if p.name != "kustomization.yaml")
    common = yaml.safe_load((K8S / "common" / "kustomization.yaml").read_text())
    assert common["kind"] == "Component" and [image["name"] for image in common["images"]] == ["mmdiff"]


def emulate_kustomize(folder: Path) -> list[dict]:
    """What `kubectl kustomize` makes of this layout (resources: files or folders, components, namespace,
    images): for machines without kubectl; checked against kubectl where it exists."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= KUSTOMIZE_KEYS, f"{folder}: the emulation does not cover {set(kustomization) - KUSTOMIZE_KEYS}"
    docs = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        docs += emulate_kustomize(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for layer in [*(yaml.safe_load((folder / c / "kustomization.yaml").read_text())
                    for c in kustomization.get("components", [])), kustomization]:
        images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in layer.get("images", [])}
        for doc in docs:
            if "namespace" in layer:
                doc["metadata"]["namespace"] = layer["namespace"]
            retag(doc, images)
    return docs


def retag(node, images: dict[str, str]) -> None:
    """Kustomize's image transformer: every container and init container, at any depth (CRDs included)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                for container in value:
                    container["image"] = images.get(container["image"], container["image"])
            retag(value, images)
    elif isinstance(node, list):
        for item in node:
            retag(item, images)


def kustomize(folder: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return emulate_kustomize(folder)
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {folder}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def keyed(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_each_step_renders_with_kustomize_into_the_namespace_and_the_pushed_image():
    """`kubectl kustomize infra/k8s/<step>` (or the emulation, where kubectl is missing) for every step: the
    step's objects only, all in the namespace, every container (init containers too) on the image the
    common component names, each pod spec still valid; the whole folder is the union of the steps."""
    common = yaml.safe_load((K8S / "common" / "kustomization.yaml").read_text())
    (image,) = [f"{i['newName']}:{i['newTag']}" for i in common["images"]]
    every = {}
    for step, kinds in STEPS.items():
        docs = keyed(kustomize(K8S / step))
        if shutil.which("kubectl"):  # the emulation stands in for kubectl elsewhere: it must agree with it
            assert docs == keyed(emulate_kustomize(K8S / step)), step
        assert {kind for kind, _ in docs} == kinds, step
        for doc in docs.values():
            assert doc["metadata"]["namespace"] == common["namespace"], (step, doc["metadata"])
            for spec in pod_specs(doc) if doc["kind"] in ("Job", "Deployment", "RayJob", "RayService") else []:
                images = {c["image"] for c in spec.get("initContainers", []) + spec["containers"]}
                assert images == {image}, (step, images)
                check_pod_spec({**spec, "containers": [{**c, "image": "mmdiff"} for c in spec["containers"]],
                                "initContainers": [{**c, "image": "mmdiff"} for c in spec.get("initContainers", [])]},
                               step)
        every.update(docs)
    assert keyed(kustomize(K8S)) == every


def test_training_waits_for_the_shards_preprocessing_writes(tmp_path):
    """The training pods' init container runs the gate on the folder the RayJob writes and the training
    config reads; the gate itself (infra/k8s/wait.py) run on a folder: not ready without the manifest or
    while a job holds the lease, ready once the manifest is there and the lease is gone."""
    from infra.k8s import wait

    job = by_kind("train/train-job.yaml", "Job")["spec"]["template"]["spec"]
    (gate,) = job["initContainers"]
    command = gate["command"]
    assert command[:5] == ["python", "-m", "infra.k8s.wait", "shards", command[4]]
    shards = command[4]
    rayjob = shlex.split(by_kind("data/preprocess-rayjob.yaml", "RayJob")["spec"]["entrypoint"])
    assert f"output.path={shards}" in rayjob
    (container,) = job["containers"]
    argv = shlex.split(container["args"][0].split("exec ", 1)[1].replace("\\\n", " "))
    config = argv[argv.index("--config") + 1]
    assert str(load_train_config(REPO / config, {}, check_data=False).data.shards) == shards
    assert {m["mountPath"]: m.get("readOnly") for m in gate["volumeMounts"]} == {"/data": True}

    folder, quick = tmp_path / "shards", ["--timeout-s", "0.2", "--poll-s", "0.05"]
    assert wait.main(["shards", str(folder), *quick]) == 1  # nothing written yet
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    (folder / "lock.json").write_text("{}")
    assert wait.main(["shards", str(folder), *quick]) == 1  # a job still holds the folder
    (folder / "lock.json").unlink()
    assert wait.main(["shards", str(folder), *quick]) == 0


def test_serving_waits_for_every_model_its_serve_config_serves():
    from infra.k8s.rayservice import model_uris

    service = by_kind("serve/rayservice.yaml", "RayService")
    uris = model_uris(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert uris == model_uris(yaml.safe_load((REPO / "infra/serving/serve_config.yaml").read_text())) and uris
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert [g["command"] for g in head["initContainers"]] == [["python", "-m", "infra.k8s.wait", "model", u] for u in uris]
    for gate in head["initContainers"]:  # the registry it asks is the one the replicas load from
        assert {e["name"]: e["value"] for e in gate["env"]} == {e["name"]: e["value"] for e in head["containers"][0]["env"]}


def ray_groups(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def check_ray_cluster(cluster: dict) -> None:
    """The RayClusterSpec fields KubeRay's CRD types: rayStartParams is map[string]string, the version is
    the Ray in the image, replicas within min/max, and each worker's num-gpus is the GPUs its pod gets."""
    assert cluster["rayVersion"] == ray.__version__
    for group in ray_groups(cluster):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        assert group["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert group["rayStartParams"]["num-gpus"] == limits["nvidia.com/gpu"]
        assert group["rayStartParams"]["num-cpus"] == limits["cpu"]


def test_preprocess_rayjob_runs_the_installed_command_on_a_valid_config():
    job = by_kind("data/preprocess-rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["submissionMode"] == "K8sJobMode"
    check_ray_cluster(job["spec"]["rayClusterSpec"])
    argv = shlex.split(job["spec"]["entrypoint"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[argv[0]] == "pipeline.cli:preprocess"
    config, overrides = argv[argv.index("--config") + 1], argv[argv.index("--set") + 1:]
    loaded = load_config(REPO / config, PreprocessConfig, parse_overrides(overrides))
    assert str(loaded.output.path) == "/data/shards/mmdiff"
    # the job's stages fit the workers: the actors and tasks of every stage it runs, CPUs and GPUs summed
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = workers["maxReplicas"] * int(workers["rayStartParams"]["num-gpus"])
    cpus = workers["maxReplicas"] * int(workers["rayStartParams"]["num-cpus"])
    stages = [getattr(loaded.stages, name) for name in ("load", "annotate", *model_steps(loaded))]
    assert loaded.stages.mode == "per_model" and len(stages) == 5
    assert 7.5 < sum(s.concurrency * s.num_gpus for s in stages) <= gpus
    assert sum(s.concurrency * s.num_cpus for s in stages) <= cpus


def test_training_job_script_gives_deepspeed_a_valid_no_ssh_launch(tmp_path, monkeypatch):
    """Runs the Job's own shell script with `mmdiff-train` swapped for a recorder, hands what it got to the
    real mmdiff-train (train.launch: config check included) with its final exec captured, and parses that
    DeepSpeed command with DeepSpeed's own launcher parser and hostfile reader."""
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    from test_train_data import write_shards
    from train import launch

    service, job = by_kind("train/train-job.yaml", "Service"), by_kind("train/train-job.yaml", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["NODES"]) == spec["completions"]
    assert env["GPUS_PER_NODE"] == container["resources"]["limits"]["nvidia.com/gpu"]

    recorder = tmp_path / "mmdiff-train"
    recorder.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/argv\n")
    recorder.chmod(recorder.stat().st_mode | stat.S_IEXEC)
    shell = {**os.environ, **env, "JOB_COMPLETION_INDEX": "1", "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([*container["command"], *container["args"]], env=shell, check=True, timeout=60, cwd=tmp_path)
    argv = (tmp_path / "argv").read_text().splitlines()

    captured = []
    monkeypatch.setattr(launch.os, "execvpe", lambda file, cmd, env: captured.append(cmd))
    monkeypatch.chdir(REPO)  # the image's working directory holds configs/, as the repository does
    shards = write_shards(tmp_path / "shards", num_samples=2, per_shard=2)  # the cluster's volume, stood in for
    launch.main([*argv, "--set", f"data.shards={shards}"])
    (command,) = captured
    runner = command.index("deepspeed.launcher.runner")
    args = parse_args(command[runner + 1:])
    assert args.no_ssh and args.node_rank == 1 and args.module and args.user_script == "train.main"
    assert args.master_addr == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert args.master_port == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
    hosts = fetch_hostfile(args.hostfile)
    os.remove(args.hostfile)
    assert list(hosts.values()) == [int(env["GPUS_PER_NODE"])] * spec["completions"]
    user = args.user_args
    config = load_train_config(user[user.index("--config") + 1], parse_overrides(user[user.index("--set") + 1:]))
    assert config.mlflow.tracking_uri == env["MLFLOW_TRACKING_URI"]


def serve_config_for_test(tmp_path: Path) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [{
        "name": "mmdiff", "route_prefix": "/", "import_path": "infra.serving.app:app",
        "deployments": [{"name": "MMDiffServer", "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0},
                         "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}]}]}))
    return path


def test_rayservice_embeds_the_validated_serve_config_and_sizes_workers_per_replica(tmp_path):
    source = serve_config_for_test(tmp_path)
    manifest = rayservice.render(source, gpus_per_replica=1)
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    cluster = manifest["spec"]["rayClusterConfig"]
    check_ray_cluster(cluster)
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (deployment,) = serve["applications"][0]["deployments"]
    assert deployment["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    (workers,) = cluster["workerGroupSpecs"]
    # one pod per replica, scaled by KubeRay between Serve's autoscaling bounds
    assert (workers["minReplicas"], workers["maxReplicas"], cluster["enableInTreeAutoscaling"]) == (1, 4, True)
    assert workers["rayStartParams"]["num-gpus"] == "1"
    cpu_only = rayservice.render(source)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert "num-gpus" not in cpu_only["rayStartParams"]
    assert "nvidia.com/gpu" not in cpu_only["template"]["spec"]["containers"][0]["resources"]["limits"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "no_colon"}]}))
    with pytest.raises(ValueError, match="bad.yaml: not a valid Ray Serve config"):
        rayservice.render(bad)


def test_shipped_rayservice_is_generated_from_the_shipped_serve_config(tmp_path, monkeypatch):
    shipped = (K8S / "serve" / "rayservice.yaml").read_text()
    command = shlex.split(shipped.splitlines()[0].split("`")[1])
    assert command[:3] == ["python", "-m", "infra.k8s.rayservice"]
    args = command[3:command.index("--out")]
    monkeypatch.chdir(REPO)
    out = tmp_path / "rayservice.yaml"
    rayservice.main([*args, "--out", str(out)])
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(shipped), f"rerun: {shlex.join(command)}"
    check_ray_cluster(yaml.safe_load(shipped)["spec"]["rayClusterConfig"])
    serve = yaml.safe_load(yaml.safe_load(shipped)["spec"]["serveConfigV2"])
    for app in serve["applications"]:
        assert importlib.util.find_spec(app["import_path"].split(":")[0]), app["import_path"]


def test_jobs_and_serving_point_at_the_shipped_mlflow_service():
    service = by_kind("mlflow/mlflow.yaml", "Service")
    uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    (container,) = by_kind("train/train-job.yaml", "Job")["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["value"] for e in container["env"]}["MLFLOW_TRACKING_URI"] == uri
    rayservice_doc = by_kind("serve/rayservice.yaml", "RayService")
    for spec in pod_specs(rayservice_doc):
        for c in spec["containers"]:
            assert {e["name"]: e["value"] for e in c["env"]}["MLFLOW_TRACKING_URI"] == uri
    for app in yaml.safe_load(rayservice_doc["spec"]["serveConfigV2"])["applications"]:
        assert app.get("runtime_env", {}).get("env_vars", {}).get("MLFLOW_TRACKING_URI", uri) == uri

"""Cluster definitions (cluster/), validated offline because they cannot be launched here.

- Ray cluster-launcher YAMLs: Ray's own JSON schema (ray/autoscaler/ray-schema.json) on the
  file as written and after ``prepare_config`` (the defaults merge ``ray up`` does), then the
  properties that matter: GPU groups from 0, token auth on every node, no public ingress,
  dashboard on loopback, shell commands that parse.
- KubeRay manifests: no maintained validator with the ray.io CRDs installs offline, so the
  ray.io fields are checked against the field lists of KubeRay's Go API types
  (ray-operator/apis/ray/v1/raycluster_types.go, rayjob_types.go, which generate the CRDs);
  every pod template and the volume claim are validated against the Kubernetes JSON schema
  (kubernetes-validate, strict mode).
- runtime_env files: Ray's RuntimeEnv type checks, and the pip list against pyproject.toml.
No Ray cluster is started; the whole file runs in a few seconds.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
PUBLIC_CIDRS = ("0.0.0.0/0", "::/0")
# What every launcher node exports before Ray runs: token mode, and the token file's path.
AUTH_EXPORT = "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/ray_auth_token"
K8S_VERSION = "1.32.0"

# Field names of the ray.io/v1 API types (KubeRay >= 1.6), from raycluster_types.go and
# rayjob_types.go. A key outside these sets is a typo the API server would drop or reject.
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs",
}
AUTH_OPTIONS_FIELDS = {"enableK8sTokenAuth", "secretName", "mode"}
AUTOSCALER_OPTIONS_FIELDS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
    "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args",
}
HEAD_GROUP_FIELDS = {
    "template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
    "rayStartParams", "serviceType",
}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy",
    "numOfHosts",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointMemory", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}
RUNTIME_ENV_FIELDS = {
    "working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda",
    "env_vars", "container", "image_uri", "config", "java_jars", "nsight", "mpi",
}

# Shapes of real secrets: Ray tokens are secrets.token_hex(32); AWS access keys; HF tokens;
# private keys. None may appear in a committed cluster file.
SECRET_PATTERNS = {
    "64-hex token (Ray auth token format)": re.compile(r"\b[0-9a-f]{64}\b"),
    "AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
# Environment variable names that hold secrets (HF_TOKEN, RAY_AUTH_TOKEN, AWS_SECRET_ACCESS_KEY).
SECRET_ENV_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY)(_|$)")


def pyproject() -> dict:
    """The ``[project]`` table of pyproject.toml (tomllib is stdlib from Python 3.11)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def walk_strings(obj: Any) -> Iterator[str]:
    """Every string (keys and values) in a parsed YAML document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from walk_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk_strings(v)
    elif isinstance(obj, str):
        yield obj


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def prepared(config: dict) -> dict:
    """The config as ``ray up`` sees it: provider defaults merged, setup commands merged."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


def launcher(name: str) -> dict:
    return load(CLUSTER / name)


def gpu_count(node_type: dict) -> int:
    return int(node_type.get("resources", {}).get("GPU", 0))


def all_command_lists(config: dict) -> Iterator[tuple[str, list[str]]]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        yield key, config.get(key, [])
    for name, node_type in config["available_node_types"].items():
        for key in ("initialization_commands", "worker_setup_commands"):
            if key in node_type:
                yield f"{name}.{key}", node_type[key]


# ---------------------------------------------------------------- Ray cluster launcher


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_validates_against_rays_schema(name):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = launcher(name)
    jsonschema.validate(config, ray_schema())
    validate_config(prepared(config))  # what `ray up` runs after filling in defaults


def test_launcher_schema_check_rejects_a_misspelled_field():
    """The schema check above is live: one misspelled key in a node type fails it."""
    import jsonschema

    config = launcher("aws.yaml")
    config["available_node_types"]["ray.worker.gpu.l4"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, ray_schema())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_has_cpu_head_and_gpu_groups_from_zero(name):
    config = prepared(launcher(name))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert gpu_count(head) == 0, "the head must be a CPU node"
    head_cfg = json.dumps(head["node_config"])
    assert not re.search(r'"(g[0-9]|p[0-9]|a[0-9])[\w-]*\.\w+"|"(g2|a2|a3)-', head_cfg), head_cfg
    assert "guestAccelerators" not in head["node_config"]

    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    gpu_groups = {n: t for n, t in workers.items() if gpu_count(t) > 0}
    assert len(gpu_groups) >= 2, f"expected an inference and a training GPU group: {sorted(types)}"
    for n, t in workers.items():
        assert t["min_workers"] == 0, f"{n}: min_workers must be 0 (scale from zero)"
        assert t["max_workers"] >= 1, f"{n}: max_workers must allow scaling up"
    assert config["max_workers"] >= max(t["max_workers"] for t in workers.values())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_opens_nothing_to_the_internet(name):
    config = launcher(name)
    for s in walk_strings(config):
        assert not any(c in s for c in PUBLIC_CIDRS), f"public CIDR in {name}: {s!r}"
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not rule.get("IpRanges") and not rule.get("Ipv6Ranges"), rule
    for n, t in config["available_node_types"].items():
        node_config = t["node_config"]
        if config["provider"]["type"] == "aws":
            # Without SecurityGroupIds Ray creates a group with SSH open to 0.0.0.0/0.
            assert node_config.get("SecurityGroupIds"), f"{n}: set SecurityGroupIds"
        elif config["provider"]["type"] == "gcp":
            # Without networkInterfaces Ray picks the project's first subnet (the default
            # network, whose default-allow-ssh rule is open to the internet).
            nics = node_config.get("networkInterfaces", [])
            assert nics and all(nic.get("subnetwork") for nic in nics), f"{n}: set a subnet"
            assert "craft-ray" in node_config.get("tags", {}).get("items", []), n


def ray_start_options(command: str) -> dict[str, str]:
    """The ``--flag=value`` options of the ``ray start`` in a shell command."""
    tokens = shlex.split(command.replace(";", " ; "))
    start = next(i for i, t in enumerate(tokens) if t == "ray" and tokens[i + 1] == "start")
    opts = {}
    for t in tokens[start + 2:]:
        if t == ";":
            break
        if t.startswith("--"):
            key, _, value = t[2:].partition("=")
            opts[key] = value
    return opts


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_dashboard_and_token_auth(name):
    config = prepared(launcher(name))
    starts = {"head": config["head_start_ray_commands"],
              "worker": config["worker_start_ray_commands"]}
    for role, commands in starts.items():
        start = [c for c in commands if "ray start" in c]
        assert len(start) == 1, (role, commands)
        cmd = start[0]
        # Token auth: explicit mode, and the start refuses to run without the token file.
        assert AUTH_EXPORT + ";" in cmd and cmd.index(AUTH_EXPORT) < cmd.index("ray start"), cmd
        assert "set -e;" in cmd and "test -s ~/ray_auth_token;" in cmd, cmd
        opts = ray_start_options(cmd)
        if role == "head":
            assert opts.get("head") == ""
            # Loopback only (also Ray's default); reached through `ray dashboard` (SSH tunnel).
            assert opts.get("dashboard-host", "127.0.0.1") in ("127.0.0.1", "localhost"), opts
    assert not any("RAY_AUTH_MODE=disabled" in s for s in walk_strings(config))

    # The token reaches every node as a file copied over SSH, from outside the repository, to
    # the path RAY_AUTH_TOKEN_PATH names.
    mounts = config["file_mounts"]
    assert mounts.get("~/ray_auth_token", "").startswith("~/.ray/"), mounts
    # Every setup path (merged head/worker lists and each node type's own list) checks the
    # token, keeps it private and exports RAY_AUTH_MODE=token for later `ray` commands.
    lists = {"head": config["head_setup_commands"], "worker": config["worker_setup_commands"]}
    lists.update({n: t["worker_setup_commands"] for n, t in config["available_node_types"].items()
                  if "worker_setup_commands" in t})
    for where, cmds in lists.items():
        joined = "\n".join(cmds)
        assert "test -s ~/ray_auth_token" in joined, where
        assert "chmod 600 ~/ray_auth_token" in joined, where
        assert AUTH_EXPORT in joined, where


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_installs_craft_ray_with_the_right_torch(name):
    config = prepared(launcher(name))
    types = config["available_node_types"]
    assert config["docker"]["head_image"].endswith("-cpu"), "CPU head, CPU image"
    head = "\n".join(config["head_setup_commands"])
    assert "download.pytorch.org/whl/cpu" in head, "the CPU head installs the CPU torch wheel"
    assert head.index("whl/cpu") < head.index('"$HOME/craft_ray"'), "CPU torch before craft_ray"
    for n, t in types.items():
        if n == config["head_node_type"]:
            continue
        cmds = "\n".join(t.get("worker_setup_commands", config["worker_setup_commands"]))
        if gpu_count(t):
            assert '"$HOME/craft_ray[gpu]"' in cmds, f"{n}: GPU workers install the [gpu] extra"
        else:
            assert "whl/cpu" in cmds and '"$HOME/craft_ray"' in cmds, n
    assert config["file_mounts"].get("~/craft_ray") == "."
    for pattern in ("runs/", ".venv/", ".git/"):
        assert pattern in config["rsync_exclude"], pattern


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_shell_commands_parse(name):
    config = launcher(name)
    for where, commands in all_command_lists(config):
        for cmd in commands:
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{name} {where}: {cmd!r}: {r.stderr}"


# ---------------------------------------------------------------- KubeRay


def kuberay(name: str) -> dict:
    return load(KUBERAY / name)


def cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": kuberay("raycluster.yaml")["spec"],
            "rayjob.yaml": kuberay("rayjob.yaml")["spec"]["rayClusterSpec"]}


def groups(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g


def container_gpus(group: dict) -> int:
    total = 0
    for c in group["template"]["spec"]["containers"]:
        res = c.get("resources", {})
        total += int(res.get("limits", {}).get("nvidia.com/gpu", 0))
    return total


def unknown(obj: dict, allowed: set[str]) -> set[str]:
    return set(obj) - allowed


@pytest.mark.parametrize("which", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_cluster_spec_fields(which):
    spec = cluster_specs()[which]
    assert not unknown(spec, RAYCLUSTER_SPEC_FIELDS), unknown(spec, RAYCLUSTER_SPEC_FIELDS)
    assert spec["rayVersion"].startswith("2.60")
    assert not unknown(spec["authOptions"], AUTH_OPTIONS_FIELDS)
    assert not unknown(spec["autoscalerOptions"], AUTOSCALER_OPTIONS_FIELDS)
    assert spec["autoscalerOptions"].get("upscalingMode") in (None, "Default", "Aggressive",
                                                               "Conservative")
    head = spec["headGroupSpec"]
    assert not unknown(head, HEAD_GROUP_FIELDS), unknown(head, HEAD_GROUP_FIELDS)
    names = set()
    for name, group in groups(spec):
        if name != "head":
            assert not unknown(group, WORKER_GROUP_FIELDS), unknown(group, WORKER_GROUP_FIELDS)
            for required in ("groupName", "minReplicas", "maxReplicas", "template"):
                assert required in group, (name, required)
            assert name not in names, f"duplicate groupName {name}"
            names.add(name)
        # rayStartParams is map[string]string: a bare YAML number or bool is rejected.
        for k, v in group.get("rayStartParams", {}).items():
            assert isinstance(v, str), f"{name}: rayStartParams.{k} must be a string"
        containers = group["template"]["spec"]["containers"]
        assert containers[0]["name"].startswith("ray-"), "the Ray container must be first"


def test_kuberay_manifests_kinds():
    rc, rj = kuberay("raycluster.yaml"), kuberay("rayjob.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")
    for doc in (rc, rj):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert not unknown(rj["spec"], RAYJOB_SPEC_FIELDS), unknown(rj["spec"], RAYJOB_SPEC_FIELDS)
    assert rj["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode")


def test_rayjob_runs_the_pipeline_on_the_raycluster_spec():
    from ray.runtime_env import RuntimeEnv

    rj = kuberay("rayjob.yaml")["spec"]
    assert shlex.split(rj["entrypoint"])[:4] == ["python", "jobs/run.py", "--config",
                                                "configs/bioqa.yaml"]
    # One cluster definition: the RayJob's cluster is the RayCluster's spec, verbatim.
    assert rj["rayClusterSpec"] == kuberay("raycluster.yaml")["spec"], (
        "cluster/kuberay/rayjob.yaml spec.rayClusterSpec differs from raycluster.yaml spec: "
        "edit both together")
    env = yaml.safe_load(rj["runtimeEnvYAML"])
    assert not unknown(env, RUNTIME_ENV_FIELDS)
    # working_dir is a path inside the image (the submitter pod uploads it), so RuntimeEnv,
    # which checks that a local working_dir exists, sees the rest only.
    assert env.pop("working_dir") == "/home/ray/craft_ray"
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/craft_ray" in dockerfile, "the image must hold the project there"
    for needed in ("jobs", "configs", "craft_ray"):
        assert re.search(rf"^COPY .*\b{needed}\b", dockerfile, re.M), needed
    RuntimeEnv(**env)  # Ray's own type checks
    assert {"runs/", ".venv/"} <= set(env["excludes"])
    assert rj["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("which", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_security(which):
    spec = cluster_specs()[which]
    # Token auth from a Kubernetes Secret the operator injects by reference.
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"].get("secretName"), "use a pre-created Secret (authOptions)"
    assert spec["authOptions"].get("enableK8sTokenAuth") in (None, False)
    for name, group in groups(spec):
        pod = group["template"]["spec"]
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for e in c.get("env", []):
                if e["name"] == "RAY_AUTH_MODE":
                    assert e.get("value") == "token", (name, e)
                if SECRET_ENV_NAME.search(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), (
                        f"{name}: {e['name']} must come from a Secret, not a literal")
    # The dashboard stays inside the cluster: ClusterIP head Service, no Ingress.
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("enableIngress", False) is False
    assert "ingressOptions" not in head
    if "headService" in head:
        assert head["headService"].get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    # GPU groups scale from zero with the in-tree autoscaler; the head has no GPU.
    assert spec["enableInTreeAutoscaling"] is True
    assert container_gpus(head) == 0
    gpu_groups = [(n, g) for n, g in groups(spec) if n != "head" and container_gpus(g)]
    assert len(gpu_groups) >= 2
    for name, group in groups(spec):
        if name != "head":
            assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, name
            assert group["maxReplicas"] >= 1, name


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_workers_reach_the_bucket_through_a_node_identity(name):
    """Object storage from the nodes' identity, never keys: every worker node type carries the
    instance profile (AWS) / service account (GCP) to set; the head keeps the one `ray up`
    creates for it (it launches the workers and may use the bucket)."""
    config = launcher(name)
    for node_name, node in config["available_node_types"].items():
        nc = node["node_config"]
        if node_name == config["head_node_type"]:
            assert "IamInstanceProfile" not in nc and "serviceAccounts" not in nc, node_name
        elif name == "aws.yaml":
            assert re.fullmatch(r"arn:aws:iam::REPLACE_ME:instance-profile/[\w+=,.@-]+",
                                nc["IamInstanceProfile"]["Arn"]), node_name
        else:
            (account,) = nc["serviceAccounts"]
            assert account["email"].endswith(".iam.gserviceaccount.com"), node_name
            assert account["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"]
    assert not [s for s in walk_strings(config) if re.search(
        r"AWS_(SECRET_)?ACCESS_KEY|GOOGLE_APPLICATION_CREDENTIALS", s)]


def test_kuberay_pods_reach_the_bucket_through_workload_identity():
    """Every Ray pod of both manifests runs as the service account of storage.yaml, which
    carries the IRSA and GKE Workload Identity annotations; no pod gets cloud keys."""
    (account,) = [d for d in yaml.safe_load_all((KUBERAY / "storage.yaml").read_text())
                  if d["kind"] == "ServiceAccount"]
    name = account["metadata"]["name"]
    notes = account["metadata"]["annotations"]
    assert re.fullmatch(r"arn:aws:iam::REPLACE_ME:role/[\w+=,.@-]+",
                        notes["eks.amazonaws.com/role-arn"])
    assert notes["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    assert account.get("automountServiceAccountToken", True)  # the autoscaler sidecar's
    for which, spec in cluster_specs().items():
        for group, body in groups(spec):
            pod = body["template"]["spec"]
            assert pod.get("serviceAccountName") == name, (which, group)
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                names = {e["name"] for e in c.get("env", [])}
                assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                    "GOOGLE_APPLICATION_CREDENTIALS"}, (which, group)


def test_kuberay_directory_exposes_no_service_or_ingress():
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            assert doc["kind"] not in ("Ingress", "Gateway", "HTTPRoute"), path.name
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path.name


def pod_template_documents() -> Iterator[tuple[str, dict]]:
    for which, spec in cluster_specs().items():
        for name, group in groups(spec):
            yield f"{which}:{name}", {
                "apiVersion": "v1", "kind": "PodTemplate",
                "metadata": {"name": f"craft-ray-{name}"}, "template": group["template"]}


def test_kuberay_pod_templates_validate_against_kubernetes_schema():
    kv = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")
    docs = list(pod_template_documents())
    assert len(docs) == 8
    for where, doc in docs:
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            raise AssertionError(f"{where}: {e.message} at {list(e.path)}") from None
    storage_docs = {d["kind"]: d for d in yaml.safe_load_all((KUBERAY / "storage.yaml")
                                                             .read_text())}
    assert set(storage_docs) == {"PersistentVolumeClaim", "ServiceAccount"}
    for doc in storage_docs.values():
        kv.validate(doc, K8S_VERSION, strict=True)
    assert storage_docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kubernetes_schema_check_rejects_a_misspelled_field():
    kv = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")
    _, doc = next(pod_template_documents())
    doc = copy.deepcopy(doc)
    doc["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- all cluster files


def cluster_text_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file())


def test_no_secret_values_in_cluster_files():
    files = cluster_text_files() + [ROOT / "docs" / "cluster.md"]
    assert len(files) >= 8
    for path in files:
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            m = pattern.search(text)
            assert m is None, f"{path.relative_to(ROOT)}: looks like a {what}: {m.group(0)!r}"
        # A token given in clear, e.g. RAY_AUTH_TOKEN=abc or RAY_AUTH_TOKEN: abc.
        for m in re.finditer(r"RAY_AUTH_TOKEN\s*[=:]\s*(\S+)", text):
            assert m.group(1).startswith(("$", '"$', "'$", "<")), (
                f"{path.relative_to(ROOT)}: RAY_AUTH_TOKEN set to a literal: {m.group(0)!r}")


def test_secret_scan_catches_a_token():
    token = "0123456789abcdef" * 4  # the shape `ray get-auth-token --generate` prints
    assert SECRET_PATTERNS["64-hex token (Ray auth token format)"].search(f"token: {token}")


def test_cluster_files_use_the_projects_ray_version():
    from packaging.requirements import Requirement

    pins = pyproject()["dependencies"]
    ray_pin = next(Requirement(p) for p in pins if Requirement(p).name == "ray")
    versions = set()
    for name in LAUNCHER_FILES:
        for s in walk_strings(launcher(name)["docker"]):
            versions.update(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", s))
    for spec in cluster_specs().values():
        versions.add(spec["rayVersion"])
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    versions.update(re.findall(r"ARG RAY_VERSION=(\d+\.\d+\.\d+)", dockerfile))
    assert len(versions) == 1, f"cluster files disagree on the Ray version: {versions}"
    assert all(v in ray_pin.specifier for v in versions), (versions, str(ray_pin))


# ---------------------------------------------------------------- runtime_env files


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env.pip.yaml"])
def test_runtime_env_files(name):
    from ray.runtime_env import RuntimeEnv

    env = load(CLUSTER / name)
    assert not unknown(env, RUNTIME_ENV_FIELDS), unknown(env, RUNTIME_ENV_FIELDS)
    RuntimeEnv(**env)  # Ray's own type checks (list of str, dict of str...)
    assert {"runs/", ".venv/", ".git/"} <= set(env["excludes"])
    assert "working_dir" not in env, "the working dir comes from --working-dir ."
    for key in env.get("env_vars", {}):
        assert not SECRET_ENV_NAME.search(key), f"secret {key} in runtime_env"


def test_pip_runtime_env_mirrors_pyproject():
    from packaging.requirements import Requirement

    project = pyproject()
    wanted = {Requirement(r).name.lower() for r in project["dependencies"]
              + project["optional-dependencies"]["gpu"]} - {"ray"}
    listed = {Requirement(r).name.lower()
              for r in load(CLUSTER / "runtime_env.pip.yaml")["pip"]["packages"]}
    assert "ray" not in listed, "never install another Ray into a job's environment"
    assert wanted <= listed, (
        f"cluster/runtime_env.pip.yaml lacks {sorted(wanted - listed)} from pyproject.toml: "
        "add them to its pip.packages")

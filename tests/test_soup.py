"""training.soup: weight averages of generators from one start, kept greedily by validation KID."""
import json

import pytest
import torch

from model.weights import WeightsError, load_generator, read_info, save_generator
from tests.conftest import photo, run_module, small_generator
from training.soup import average, greedy


def test_the_average_is_the_mean_of_every_weight_and_needs_one_architecture():
    a, b, c = small_generator(1), small_generator(2), small_generator(3)
    soup = average([a, b, c])
    for name, tensor in soup.state_dict().items():
        expected = (a.state_dict()[name].float() + b.state_dict()[name] + c.state_dict()[name]) / 3
        torch.testing.assert_close(tensor, expected)
    assert not torch.equal(soup.state_dict()["model.1.weight"], a.state_dict()["model.1.weight"])
    with pytest.raises(WeightsError, match="cannot average"):
        average([a, small_generator(1, ngf=16)])


def test_greedy_keeps_an_ingredient_only_when_the_average_validates_better():
    """A score that prefers weights near a target: the two generators on either side of it average closer to it
    than either is, and a far one is left out."""
    target = small_generator(0)
    near_1, near_2, far = (small_generator(s) for s in (1, 2, 3))
    with torch.no_grad():  # near_1, near_2: target -/+ the same offset; far: target + 3 offsets
        for t, n1, n2, f in zip(target.parameters(), near_1.parameters(), near_2.parameters(), far.parameters()):
            offset = torch.randn_like(t) * 0.01
            n1.copy_(t - offset * 1.0)
            n2.copy_(t + offset * 1.1)
            f.copy_(t + offset * 3)

    def score(g):
        distance = sum(float((p - t).pow(2).sum()) for p, t in zip(g.parameters(), target.parameters()))
        return {"kid": distance, "texture_kid": 0.0}

    kept, best = greedy({"near_1": near_1, "near_2": near_2, "far": far}, score, texture_limit=1.0, say=lambda s: None)
    assert kept == ["near_1", "near_2"] and best["kid"] < score(near_1)["kid"]
    kept, _ = greedy({"near_1": near_1, "near_2": near_2}, score, texture_limit=-1.0, say=lambda s: None)
    assert kept == ["near_1"]  # a texture KID over the limit keeps an ingredient out however good its KID
    recorded = {"far": {"kid": -1.0, "texture_kid": 0.0}}  # figures known beforehand are taken, not measured
    kept, _ = greedy({"near_1": near_1, "far": far}, score, texture_limit=1.0, say=lambda s: None, known=recorded)
    assert kept[0] == "far"


def test_the_command_writes_a_soup_no_worse_than_its_best_ingredient_by_validation(tmp_path):
    photos, paintings = tmp_path / "photos", tmp_path / "paintings"
    photos.mkdir()
    paintings.mkdir()
    for i in range(8):
        photo(48, 48, seed=i).save(photos / f"p{i}.jpg")
        photo(48, 48, seed=100 + i).convert("L").convert("RGB").save(paintings / f"m{i}.png")
    files = []
    for seed in (1, 2, 3):
        run = tmp_path / f"run{seed}" / "validated"
        run.mkdir(parents=True)
        files.append(run / "step_00000100.safetensors")
        save_generator(files[-1], small_generator(seed))
    out = tmp_path / "soup.safetensors"
    r = run_module("training.soup", *map(str, files), "--photos", str(photos), "--val-photos", str(photos),
                   "--paintings", str(paintings), "--out", str(out), "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stderr
    info, _ = read_info(out)
    kept = info.training["soup"]
    assert kept and all(name.startswith("run") and name.endswith(".safetensors") for name in kept)
    singles = {line.split(":")[0].strip(): float(line.split("KID ")[1].split(",")[0])
               for line in r.stdout.splitlines() if line.startswith("  run")}
    # the singles as printed, to 5 decimals: the soup's full figure is no worse to within that rounding
    assert len(singles) == 3 and info.training["val_kid"] <= min(singles.values()) + 5e-6
    assert str(tmp_path) not in json.dumps(info.training)  # no absolute paths in the file
    load_generator(out)
    save_generator(tmp_path / "wide.safetensors", small_generator(4, ngf=16))
    r = run_module("training.soup", str(files[0]), str(tmp_path / "wide.safetensors"), "--photos", str(photos),
                   "--paintings", str(paintings), "--out", str(tmp_path / "bad.safetensors"), "--device", "cpu")
    assert r.returncode == 2 and r.stderr.startswith("error: cannot average") and "Traceback" not in r.stderr
    assert not (tmp_path / "bad.safetensors").exists()

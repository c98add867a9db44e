"""`python -m fastcifar.ablate`: named variants run one after another into one table."""

import json

from fastcifar import ablate

SHORT = ["--config", "smoke", "run.device=cpu", "train.epochs=3", "filter.start_epoch=2", "run.max_steps_per_epoch=2",
         "train.tta=false"]


def test_variants_run_into_one_table(digits, tmp_path, capsys):
    out = tmp_path / "ablations"
    assert ablate.main(["--data-dir", str(digits), "--out", str(out), "--variants", "no-filter,class_quantile", *SHORT]) == 0
    rows = json.loads((out / "ablations.json").read_text())
    assert [r["variant"] for r in rows] == ["no-filter", "class_quantile"]
    assert [r["filtering"] for r in rows] == ["off", "class_quantile"]
    assert rows[0]["kept_fraction"] == 1.0 and rows[0]["noisy_f1"] is None  # nothing dropped: unknown
    assert 0 < rows[1]["kept_fraction"] < 1 and rows[1]["noisy_f1"] is not None
    assert all((out / r["variant"] / "summary.json").is_file() for r in rows)
    assert "| no-filter " in capsys.readouterr().out


def test_an_unknown_variant_is_one_error(digits, tmp_path, capsys):
    assert ablate.main(["--data-dir", str(digits), "--out", str(tmp_path / "x"), "--variants", "nope", *SHORT]) == 2
    assert "unknown variants ['nope']" in capsys.readouterr().err and not (tmp_path / "x").exists()

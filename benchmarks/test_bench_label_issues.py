"""Finding the wrong labels: suspects.csv's ranking beside cleanlab's, on the same run's pred_probs.npy.

A short smoke run on the digits with 40% symmetric noise (the true labels known), once per selector;
precision of the top 100 and of the top k, k = the true number of wrong labels, for our ranking
(the selector's evidence) and for `cleanlab.filter.find_label_issues(labels, pred_probs,
return_indices_ranked_by="self_confidence")` (see fastcifar.labelcheck). Longer runs, three
settings and three seeds: scripts/selection_study.py and benchmarks/results/selection-study.md.
"""

from __future__ import annotations

import pytest

from fastcifar.beton import write_digits_betons
from fastcifar.config import build_config
from fastcifar.labelcheck import compare
from fastcifar.rundir import choose_run_dir
from fastcifar.train import run_training

SELECTORS = {"threshold": {}, "class_quantile": {"filter.selector": "class_quantile", "filter.keep_fraction": "0.6"}}


@pytest.fixture(scope="module")
def noisy_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits40")
    write_digits_betons(out, noise=0.4)
    return out


@pytest.mark.parametrize("selector", list(SELECTORS))
def test_label_issue_precision(benchmark, noisy_digits, tmp_path, selector):
    pytest.importorskip("cleanlab", reason="cleanlab is the reference here: pip install 'fastcifar[bench]'")
    cfg = build_config("smoke", {"data.dir": str(noisy_digits), "run.device": "cpu", "train.tta": "false",
                                 **SELECTORS[selector]})
    run_dir = choose_run_dir(cfg, str(tmp_path / selector), "smoke")
    run_training(cfg, run_dir)
    scores = benchmark.pedantic(lambda: compare(run_dir), rounds=1, iterations=1)
    benchmark.extra_info.update(selector=selector, **scores)
    print(f"\n{selector}: ours p@100 {scores['ours_p@100']:.3f} p@{scores['wrong_labels']} {scores['ours_p@true']:.3f}"
          f" | cleanlab p@100 {scores['cleanlab_p@100']:.3f} p@true {scores['cleanlab_p@true']:.3f}"
          f" ({scores['cleanlab_flagged']} flagged)")
    assert scores["samples"] == 1618 and 0 < scores["wrong_labels"] < scores["samples"]

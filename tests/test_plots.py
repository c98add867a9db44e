"""The run's plots: titles, the kept-samples note, phases on every plot, the filter plot's lines, no collisions."""

import itertools

import pytest

from fastcifar.plots import LOSS_NOTE, figures, phase_spans, write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(n=12, filter_from=6, freeze=3):
    """A run: head until `freeze`, full until `filter_from`, then full+filter with noise scores."""
    out = []
    for e in range(n):
        filtering = e >= filter_from
        rec = {"epoch": e, "phase": "head" if e < freeze else ("full+filter" if filtering else "full"),
               "lr": 1e-3, "threshold": 2.0 * 0.995 ** (e - filter_from) if filtering else None,
               "kept_fraction": 0.7 if filtering else 1.0, "train_loss": 3.0 / (e + 1), "train_acc": 0.05 * e,
               "val_loss": 2.5 / (e + 1), "val_acc": 0.04 * e, "seconds": 1.0}
        # before filtering the trainer logged 0.0 (later: null); neither may be drawn as a line at 0
        rec.update(noisy_precision=0.8 if filtering else 0.0, noisy_recall=0.6 if filtering else None)
        out.append(rec)
    return out


def _line(fig, label):
    ax = fig.axes[0]
    return next((ln for ln in ax.get_lines() if ln.get_label() == label), None)


def _legend_labels(fig):
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_every_plot_has_a_title_and_names_the_phases():
    figs = figures(_records(), noise_rate=0.4)
    assert set(figs) == {"accuracy", "loss", "filtering"}
    for name, fig in figs.items():
        assert fig.get_suptitle(), name
        labels = _legend_labels(fig)
        for phase in ("phase head (0-2)", "phase full (3-5)", "phase full+filter (6-11)"):
            assert phase in labels, (name, labels)


def test_the_loss_plot_says_train_loss_is_over_kept_samples():
    fig = figures(_records())["loss"]
    assert fig.axes[0].get_title() == LOSS_NOTE and "kept samples" in LOSS_NOTE
    assert "train (kept samples)" in _legend_labels(fig)


def test_filter_plot_draws_noise_scores_only_while_filtering_and_the_base_rate_dashed():
    fig = figures(_records(), noise_rate=0.4)["filtering"]
    for label in ("noise precision", "noise recall"):
        assert list(_line(fig, label).get_xdata()) == list(range(6, 12)), label  # no zero line before epoch 6
    base = _line(fig, "precision of a random drop (noise rate 40%)")
    assert base.get_linestyle() == "--" and set(base.get_ydata()) == {0.4}
    twin = fig.axes[1]
    assert twin.get_ylim()[0] == 0 and twin.get_ylabel() == "threshold (nats)"
    assert list(twin.get_lines()[0].get_xdata()) == list(range(6, 12))


def test_no_noise_lines_without_clean_labels():
    records = [{k: v for k, v in r.items() if not k.startswith("noisy_")} for r in _records()]
    fig = figures(records, noise_rate=None)["filtering"]
    assert _line(fig, "noise precision") is None and not any("random drop" in t for t in _legend_labels(fig))


@pytest.mark.parametrize("n", [1, 12, 100])
def test_titles_labels_and_legend_do_not_collide(n):
    for name, fig in figures(_records(n, filter_from=min(6, n - 1), freeze=min(3, n - 1)), 0.4).items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        parts = {"title": fig._suptitle, "note": ax.title, "xlabel": ax.xaxis.label, "ylabel": ax.yaxis.label,
                 "legend": fig.legends[0]}
        if len(fig.axes) > 1:
            parts["ylabel2"] = fig.axes[1].yaxis.label
        boxes = {k: v.get_window_extent(renderer) for k, v in parts.items()}
        boxes["axes"] = ax.get_window_extent(renderer)
        figure_box = fig.bbox
        for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
            assert not box_a.overlaps(box_b), (name, n, a, b)
        for k, box in boxes.items():
            assert figure_box.x0 - 1 <= box.x0 and box.x1 <= figure_box.x1 + 1, (name, k)
            assert figure_box.y0 - 1 <= box.y0 and box.y1 <= figure_box.y1 + 1, (name, k)


def test_phase_spans_follow_consecutive_epochs():
    records = _records(8, filter_from=5, freeze=2)
    assert phase_spans(records) == [("head", 0, 1), ("full", 2, 4), ("full+filter", 5, 7)]
    assert phase_spans(records[3:]) == [("full", 3, 4), ("full+filter", 5, 7)]


def _assert_pngs(paths, root):
    assert sorted(p.name for p in paths) == ["accuracy.png", "filtering.png", "loss.png"]
    for p in paths:
        assert p.parent == root / "plots" and p.read_bytes()[:8] == PNG_SIGNATURE
        assert p.stat().st_size > 5000, f"{p.name} is suspiciously small"
    assert not list((root / "plots").glob(".*.tmp"))


def test_write_plots_files_and_sparse_records(tmp_path):
    _assert_pngs(write_plots(tmp_path / "full", _records(), noise_rate=0.4), tmp_path / "full")
    _assert_pngs(write_plots(tmp_path / "one", _records(1)), tmp_path / "one")
    minimal = [{"epoch": e, "train_loss": 1.0 / (e + 1)} for e in range(3)]
    _assert_pngs(write_plots(tmp_path / "min", minimal), tmp_path / "min")
    records = _records()
    records[6]["threshold"] = float("inf")  # a non-finite threshold counts as not filtering
    assert list(_line(figures(records, 0.4)["filtering"], "noise precision").get_xdata()) == list(range(7, 12))
    assert write_plots(tmp_path / "empty", []) == []

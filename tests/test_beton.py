"""The .beton writer and reader: ffcv compatibility, damaged files, atomic and skipped writes, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_cifar import make_fake_cifar

from fastcifar import beton
from fastcifar.beton import open_beton, read_images, read_meta, write_beton, write_dataset, write_digits_betons
from fastcifar.sources import DataError, Split, prepare_source

ROOT = Path(__file__).resolve().parents[1]


def _split(n=50, h=32, w=32, seed=0, index_step=1) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), rng.integers(0, 10, n),
                 np.where(rng.random(n) < 0.5, rng.integers(0, 10, n), -1), np.arange(n) * index_step)


def test_written_file_is_byte_identical_to_ffcvs_writer(tmp_path):
    from fastcifar.data import keep_torch_threads

    with keep_torch_threads():  # importing ffcv sets torch's thread count to 1
        pytest.importorskip("ffcv", reason="ffcv is not installed: nothing to compare with")
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

    s = _split(n=700, h=30, w=20, index_step=3)  # 700 images span two 2 MiB pages
    write_beton(tmp_path / "ours.beton", s, progress=False)

    class Rows:
        def __len__(self):
            return len(s)

        def __getitem__(self, i):
            return s.images[i], int(s.labels[i]), int(s.clean_labels[i]), int(s.indices[i])

    with keep_torch_threads():
        fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "clean_label": IntField(),
                  "index": IntField()}
        writer = DatasetWriter(str(tmp_path / "ffcv.beton"), fields, page_size=1 << 21, num_workers=1)
        writer.from_indexed_dataset(Rows())
    assert (tmp_path / "ours.beton").read_bytes() == (tmp_path / "ffcv.beton").read_bytes()


@pytest.mark.parametrize("n, h, w", [(1, 32, 32), (683, 32, 32), (5, 17, 9), (3, 600, 700)])
def test_numpy_reader_round_trips(tmp_path, n, h, w):
    s = _split(n, h, w)
    write_beton(tmp_path / "s.beton", s, progress=False)
    index = open_beton(tmp_path / "s.beton", num_classes=10)
    assert index.image_shape == (h, w, 3) and index.num_samples == n
    assert np.array_equal(read_images(index), s.images)
    for name in ("labels", "clean_labels", "indices"):
        assert np.array_equal(getattr(index, name), getattr(s, name))


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "short tail":
        data = data[:-5]
    elif how == "unfinished":
        data[:24] = bytes(24)
    elif how == "foreign fields":
        data[24 + 1: 24 + 6] = b"photo"
    elif how == "not a beton":
        data = bytearray(b"PK\x03\x04" + bytes(5000))
    elif how == "tiny":
        data = data[:10]
    elif how == "bad pointer":
        data[24 + 4 * 1041 + 5: 24 + 4 * 1041 + 13] = (10**12).to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [
    ("truncated", "do not match the header.*truncated"), ("short tail", "truncated"),
    ("unfinished", "unfinished write"), ("foreign fields", r"fields \('photo', 'label'.*foreign"),
    ("not a beton", "format version"), ("tiny", "only 10 bytes"), ("bad pointer", "damaged"),
])
def test_damaged_files_give_one_clear_error(tmp_path, how, message):
    write_beton(tmp_path / "s.beton", _split(), progress=False)
    _damage(tmp_path / "s.beton", how)
    with pytest.raises(DataError, match=message):
        open_beton(tmp_path / "s.beton")


def test_missing_file_labels_outside_the_classes_and_foreign_indices(tmp_path):
    with pytest.raises(DataError, match="missing; write it with scripts/write_beton.py"):
        open_beton(tmp_path / "nothing.beton")
    write_beton(tmp_path / "s.beton", _split(), progress=False)
    with pytest.raises(DataError, match=r"outside \[0, 5\)"):
        open_beton(tmp_path / "s.beton", num_classes=5)
    write_beton(tmp_path / "s.beton", _split(index_step=2), progress=False)
    with pytest.raises(DataError, match="index field is not 0..N-1"):
        open_beton(tmp_path / "s.beton")


def test_fake_cifar_written_with_meta(tmp_path):
    fake = make_fake_cifar(tmp_path / "raw", n_train=120, n_test=30)
    prepared = prepare_source("cifar100n", data_dir=fake.root, label_sha256=fake.label_sha256)
    meta = write_dataset(prepared, tmp_path / "out", progress=False, print_fn=lambda *_: None)
    assert meta == read_meta(tmp_path / "out")
    assert meta["num_classes"] == 100 and meta["class_names"][99] == "class99"
    assert meta["splits"]["train"]["num_samples"] == 120 and meta["splits"]["test"]["num_samples"] == 30
    assert meta["noise_rate"] == pytest.approx((fake.noisy_labels != fake.train_labels).mean(), abs=1e-6)
    assert meta["image_shape"] == [32, 32, 3]
    train = open_beton(tmp_path / "out" / "train.beton", 100)
    assert np.array_equal(read_images(train), fake.train_images)
    assert np.array_equal(train.labels, fake.noisy_labels) and np.array_equal(train.clean_labels, fake.train_labels)


def test_bad_inputs_leave_no_output(tmp_path):
    fake = make_fake_cifar(tmp_path / "raw", n_train=20, n_test=5)
    (tmp_path / "raw" / "cifar-100-python" / "test").write_bytes(b"\x80\x02}q\x00.")  # {}: no data
    for sha in (None, fake.label_sha256):  # None: the published file's sha256, which this is not
        with pytest.raises(DataError):
            write_dataset(prepare_source("cifar100n", data_dir=fake.root, label_sha256=sha), tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_rerun_is_skipped_unless_forced_or_changed(tmp_path):
    out = tmp_path / "out"
    first = write_digits_betons(out, noise=0.2, seed=1)
    stamp = (out / "train.beton").stat().st_mtime_ns
    assert write_digits_betons(out, noise=0.2, seed=1) == first
    assert (out / "train.beton").stat().st_mtime_ns == stamp
    write_digits_betons(out, noise=0.2, seed=1, force=True)
    assert (out / "train.beton").stat().st_mtime_ns != stamp
    other = write_digits_betons(out, noise=0.3, seed=1)
    assert other["fingerprint"] != first["fingerprint"] and other["noise_rate"] == pytest.approx(0.3, abs=1e-3)
    (out / "test.beton").write_bytes(b"")  # a damaged output is rewritten, not trusted
    write_digits_betons(out, noise=0.3, seed=1)
    assert (out / "test.beton").stat().st_size == other["splits"]["test"]["bytes"]


def test_a_failed_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_digits_betons(out, noise=0.2)
    real = beton.write_beton

    def dies_on_test(path, split, progress=True):
        if Path(path).name == "test.beton":
            with beton.atomic_path(path) as tmp:
                tmp.write_bytes(b"half")
                raise KeyboardInterrupt
        real(path, split, progress=progress)

    monkeypatch.setattr(beton, "write_beton", dies_on_test)
    with pytest.raises(KeyboardInterrupt):
        write_digits_betons(out, noise=0.3)
    assert not (out / "meta.json").exists()  # so the next run rewrites everything
    assert sorted(p.name for p in out.iterdir()) == ["test.beton", "train.beton"]  # no temporaries
    with pytest.raises(DataError, match="meta.json: missing"):
        read_meta(out)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "write_beton.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_digits_then_errors(tmp_path):
    r = _cli("--source", "digits", "--noise", "0.4", "--out-dir", "out", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "held out a stratified 10%" in r.stdout and json.loads((tmp_path / "out" / "meta.json").read_text())
    r = _cli("--source", "digits", "--noise", "0.4", "--out-dir", "out", cwd=tmp_path)
    assert r.returncode == 0 and "up to date" in r.stdout
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(3, int))
    r = _cli("--source", f"npz:{tmp_path / 'bad.npz'}", "--out-dir", "bad", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "images must be (N, H, W, 3) uint8" in r.stderr and not (tmp_path / "bad").exists()
    r = _cli("--noise-kind", "sideways", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: argument --noise-kind")


def test_cli_help_explains_every_option():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("write_beton", ROOT / "scripts" / "write_beton.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
        assert action.option_strings[-1] in text
    for source in ("cifar100n", "npz:PATH", "imagefolder:PATH", "digits"):
        assert source in text

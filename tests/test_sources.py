"""Sources: CIFAR-100N acquisition and verification, npz, image folders, digits, noise, hold-out."""

from __future__ import annotations

import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fake_cifar import make_fake_cifar, write_label_file, write_py2_pickle

from fastcifar import cifar100n
from fastcifar.sources import DataError, inject_noise, load_digits, prepare_source, stratified_holdout

REAL_LABELS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar100n"


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_cifar(tmp_path_factory.mktemp("cifar"), n_train=200, n_test=50)


def _copy(fake, tmp_path: Path) -> Path:
    """A writable copy of the fake CIFAR folder, for tests that damage it."""
    import shutil

    shutil.copytree(fake.root, tmp_path / "raw")
    return tmp_path / "raw"


@pytest.mark.skipif(not REAL_LABELS.is_dir(), reason=f"the real label file folder {REAL_LABELS} is absent")
def test_real_label_file_facts():
    labels = cifar100n.load_label_file(REAL_LABELS / cifar100n.LABELS_FILE)  # checks the sha256 too
    clean, noisy = labels["clean_label"], labels["noisy_label"]
    assert clean.shape == noisy.shape == (50_000,)
    assert (clean != noisy).sum() == 20_100  # noise rate 0.402
    assert np.array_equal(np.bincount(clean, minlength=100), np.full(100, 500))
    assert noisy.min() >= 0 and noisy.max() < 100


def test_fake_cifar_loads_pixels_and_labels_in_order(fake):
    data = cifar100n.load(fake.root, labels="noisy", label_sha256=fake.label_sha256)
    assert np.array_equal(data.train.images, fake.train_images)
    assert np.array_equal(data.train.labels, fake.noisy_labels)
    assert np.array_equal(data.train.clean_labels, fake.train_labels)
    assert np.array_equal(data.test.images, fake.test_images)
    assert np.array_equal(data.test.labels, fake.test_labels)
    assert data.class_names[:2] == ("class00", "class01") and data.num_classes == 100
    clean = cifar100n.load(fake.root, labels="clean", label_sha256=fake.label_sha256)
    assert np.array_equal(clean.train.labels, fake.train_labels)


def test_cifar_unpickler_refuses_foreign_globals(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "train"
    path.write_bytes(pickle.dumps({"data": Evil()}, protocol=4))
    with pytest.raises(DataError, match="refusing to load global builtins.print"):
        cifar100n.read_cifar_pickle(path)
    assert "pwned" not in capsys.readouterr().out


def test_wrong_sha256_is_refused_before_unpickling(fake):
    with pytest.raises(DataError, match=r"sha256 is [0-9a-f]{64}, expected bd2d8040.*github.com/UCSC-REAL"):
        cifar100n.load(fake.root, label_sha256=cifar100n.LABELS_SHA256)


def test_label_file_of_wrong_length(fake, tmp_path):
    root = _copy(fake, tmp_path)
    sha = write_label_file(root / cifar100n.LABELS_FILE, fake.train_labels[:-1], fake.noisy_labels[:-1])
    with pytest.raises(DataError, match="199 labels but .* has 200 images"):
        cifar100n.load(root, label_sha256=sha)


def test_clean_labels_must_match_the_images_labels(fake, tmp_path):
    root = _copy(fake, tmp_path)
    clean = fake.train_labels.copy()
    clean[17] = (clean[17] + 1) % 100
    sha = write_label_file(root / cifar100n.LABELS_FILE, clean, fake.noisy_labels)
    with pytest.raises(DataError, match="differs from the CIFAR-100 train labels at 1 positions .first: 17"):
        cifar100n.load(root, label_sha256=sha)


def test_labels_out_of_range(fake, tmp_path):
    root = _copy(fake, tmp_path)
    noisy = fake.noisy_labels.copy()
    noisy[3] = 100
    sha = write_label_file(root / cifar100n.LABELS_FILE, fake.train_labels, noisy)
    with pytest.raises(DataError, match=r"noisy_label outside \[0, 100\)"):
        cifar100n.load(root, label_sha256=sha)
    d = cifar100n.read_cifar_pickle(root / cifar100n.CIFAR_DIR / "test")
    write_py2_pickle({b"data": d["data"], b"fine_labels": [100] * len(d["data"])},
                     root / cifar100n.CIFAR_DIR / "test")
    with pytest.raises(DataError, match=r"test: fine labels outside \[0, 100\)"):
        cifar100n.read_cifar_split(root, "test")


def test_cifar_batch_with_wrong_shape(fake, tmp_path):
    root = _copy(fake, tmp_path)
    write_py2_pickle({b"data": np.zeros((4, 3000), np.uint8), b"fine_labels": [0] * 4},
                     root / cifar100n.CIFAR_DIR / "train")
    with pytest.raises(DataError, match=r"'data' must be an \(N, 3072\) uint8 array, got \(4, 3000\)"):
        cifar100n.load(root, label_sha256=fake.label_sha256)


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_missing_files_offline_name_the_url_and_the_destination(fake, tmp_path, offline):
    with pytest.raises(DataError) as e:
        prepare_source("cifar100n", data_dir=tmp_path)
    msg = str(e.value)
    assert cifar100n.CIFAR_URL in msg and str(tmp_path / "cifar-100-python") in msg
    assert cifar100n.LABELS_URL in msg and str(tmp_path / "CIFAR-100_human.pt") in msg
    assert not any(tmp_path.iterdir())
    root = _copy(fake, tmp_path)
    (root / cifar100n.LABELS_FILE).unlink()
    with pytest.raises(DataError, match=f"cannot download {cifar100n.LABELS_URL}.*put it at {root}"):
        prepare_source("cifar100n", data_dir=root)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-100-python"]  # no partial download
    with pytest.raises(DataError, match="CIFAR-100_human.pt: missing"):
        prepare_source("cifar100n", data_dir=root, download=False)


def test_existing_folder_is_used_without_download(fake, offline):
    prepared = prepare_source("cifar100n", data_dir=fake.root, label_sha256=fake.label_sha256)
    assert prepared.load().train.images.shape == (200, 32, 32, 3)


def _npz(tmp_path: Path, **arrays) -> str:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


IM = np.zeros((4, 8, 8, 3), np.uint8)
TEST = dict(test_images=np.zeros((2, 8, 8, 3), np.uint8), test_labels=np.zeros(2, int))


@pytest.mark.parametrize("arrays, message", [
    (dict(images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4)), r"images must be \(N, H, W, 3\) uint8"),
    (dict(images=IM.astype(np.float32), labels=np.zeros(4, int)), "uint8, got .* float32"),
    (dict(images=IM, labels=np.zeros(5, int)), r"labels must be \(4,\) integers"),
    (dict(images=IM, labels=np.zeros(4)), r"labels must be \(4,\) integers"),
    (dict(images=IM), "missing array 'labels'"),
    (dict(images=IM, labels=np.zeros(4, int), test_images=TEST["test_images"]), "both test_images and test_labels"),
    (dict(images=IM, labels=np.zeros(4, int), test_images=np.zeros((2, 9, 8, 3), np.uint8),
          test_labels=np.zeros(2, int)), "test_images must be"),
    (dict(images=IM, labels=np.array([0, 1, 2, 3]), clean_labels=np.array([0, 1, 9, -2]), **TEST),
     r"clean_labels\[3\] = -2 is outside \[-1, 10\) \(row 3 of the npz"),
    (dict(images=IM, labels=np.array([0, 1, -1, 3]), **TEST), r"labels\[2\] = -1 is outside \[0, 4\) \(row 2"),
    (dict(images=IM, labels=np.array([0, 1, 2, 3]), test_images=TEST["test_images"], test_labels=np.array([0, 7]),
          class_names=np.array(["a", "b", "c", "d"])), r"test_labels\[1\] = 7 is outside \[0, 4\)"),
    (dict(images=IM[:2], labels=np.zeros(2, int), objects=np.array([{}], dtype=object)), "store plain"),
])
def test_bad_npz_is_one_clear_error(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        prepare_source(_npz(tmp_path, **arrays)).load()


def test_npz_without_test_split_holds_out_a_stratified_tenth(tmp_path):
    labels = np.repeat(np.arange(5), 20)
    clean = labels.copy()
    labels[::7] = 0  # some noise; the held-out test split should use the clean labels
    images = np.arange(100, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)
    data = prepare_source(_npz(tmp_path, images=images, labels=labels, clean_labels=clean), seed=1).load()
    assert len(data.test) == 10 and len(data.train) == 90
    assert np.array_equal(np.bincount(data.test.clean_labels), np.full(5, 2))
    assert np.array_equal(data.test.labels, data.test.clean_labels)
    train_rows, test_rows = data.source_rows
    assert np.array_equal(data.train.images[:, 0, 0, 0], train_rows)  # the rows are the source's
    assert np.array_equal(data.test.images[:, 0, 0, 0], test_rows)
    assert sorted(np.r_[train_rows, test_rows]) == list(range(100))
    assert np.array_equal(data.train.indices, np.arange(90))  # indices stay dense
    assert "held out a stratified 10%" in data.notes[0] and data.num_classes == 5


def test_holdout_and_noise_are_seeded_and_exact():
    labels = np.repeat(np.arange(10), 50)
    a, b = stratified_holdout(labels, 0.2, seed=3), stratified_holdout(labels, 0.2, seed=3)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], stratified_holdout(labels, 0.2, 4)[1])
    noisy = inject_noise(labels, 10, 0.3, "symmetric", seed=5)
    assert (noisy != labels).sum() == 150 and np.array_equal(noisy, inject_noise(labels, 10, 0.3, "symmetric", 5))
    flipped = inject_noise(labels, 10, 0.3, "pairflip", seed=5)
    changed = flipped != labels
    assert changed.sum() == 150 and np.array_equal(flipped[changed], (labels[changed] + 1) % 10)


def test_digits_demo_source():
    data = prepare_source("digits", noise=0.4, noise_kind="pairflip", seed=0).load()
    assert data.train.images.shape[1:] == (32, 32, 3) and data.train.images.dtype == np.uint8
    assert len(data.train) + len(data.test) == 1797 and data.num_classes == 10
    wrong = data.train.labels != data.train.clean_labels
    assert abs(wrong.mean() - 0.4) < 1e-3
    assert np.array_equal(data.train.labels[wrong], (data.train.clean_labels[wrong] + 1) % 10)
    assert np.array_equal(data.test.labels, data.test.clean_labels)  # the test split stays clean
    plain = load_digits(holdout=0.1, seed=0)
    assert np.array_equal(plain.train.images, data.train.images)
    assert (data.train.images[..., 0] == data.train.images[..., 2]).all()  # grey, as RGB


def test_imagefolder_with_clean_csv(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    (tmp_path / "clean.csv").write_text("path,clean_label\ncat/1.png,dog\ndog/0.png,dog\n")
    data = prepare_source(f"imagefolder:{tmp_path}", image_size=16, clean_csv=tmp_path / "clean.csv").load()
    assert data.class_names == ("cat", "dog") and data.train.images.shape == (6, 16, 16, 3)
    assert list(data.train.labels) == [0, 0, 0, 1, 1, 1]
    assert list(data.train.clean_labels) == [-1, 1, -1, 1, -1, -1]
    assert data.train_names[1] == "cat/1.png" and len(data.test) == 2
    (tmp_path / "bad.csv").write_text("path,clean_label\ncat/9.png,dog\n")
    with pytest.raises(DataError, match=r"bad.csv:2: 'cat/9.png' is not an image under train/"):
        prepare_source(f"imagefolder:{tmp_path}", clean_csv=tmp_path / "bad.csv").load()
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        prepare_source(f"imagefolder:{tmp_path}").load()


def test_unknown_source_and_bad_options():
    with pytest.raises(DataError, match="unknown --source 'tfds:x'"):
        prepare_source("tfds:x")
    with pytest.raises(DataError, match="use --labels clean with --noise"):
        prepare_source("cifar100n", noise=0.2)
    with pytest.raises(DataError, match=r"noise rate must be in \[0, 1\)"):
        prepare_source("digits", noise=1.5).load()


def test_npz_label_error_names_the_npz_row_even_after_a_hold_out(tmp_path):
    labels = np.repeat(np.arange(5), 20)
    labels[57] = 9  # out of range for 5 class names; the hold-out would renumber the rows
    images = np.zeros((100, 4, 4, 3), np.uint8)
    spec = _npz(tmp_path, images=images, labels=labels, class_names=np.array(list("abcde")))
    with pytest.raises(DataError, match=r"labels\[57\] = 9 is outside \[0, 5\) \(row 57 of the npz; 1 such"):
        prepare_source(spec).load()


def _image_folder(root: Path, test_classes=("cat", "dog")) -> Path:
    from PIL import Image

    for split, classes in (("train", ("cat", "dog")), ("test", test_classes)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / split / c / "0.png")
    return root


def test_imagefolder_test_split_missing_a_class_gets_a_note(tmp_path):
    data = prepare_source(f"imagefolder:{_image_folder(tmp_path, test_classes=('cat',))}", image_size=8).load()
    assert any("test has no images of 1 of the 2 classes (dog)" in n for n in data.notes), data.notes
    full = prepare_source(f"imagefolder:{_image_folder(tmp_path / 'both')}", image_size=8).load()
    assert not any("has no images" in n for n in full.notes)


def test_write_beton_quiet_silences_the_imagefolder_bars(tmp_path, capsys):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("write_beton", Path(__file__).resolve().parents[1] / "scripts" / "write_beton.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = _image_folder(tmp_path / "photos")
    argv = ["--source", f"imagefolder:{folder}", "--image-size", "8"]
    assert module.main([*argv, "--out-dir", str(tmp_path / "loud")]) == 0
    assert "reading train/" in capsys.readouterr().err  # tqdm writes its bars to stderr
    assert module.main([*argv, "--out-dir", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""

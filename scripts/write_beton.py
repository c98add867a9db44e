#!/usr/bin/env python
"""Write OUT/train.beton, OUT/test.beton and OUT/meta.json from CIFAR-100N or your own data.

Examples:
  python scripts/write_beton.py                                  # CIFAR-100 + CIFAR-100N (downloads)
  python scripts/write_beton.py --labels clean --noise 0.4       # CIFAR-100, 40% symmetric noise
  python scripts/write_beton.py --source digits --noise 0.4      # offline demo data
  python scripts/write_beton.py --source npz:my.npz --out-dir data/mine
  python scripts/write_beton.py --source imagefolder:photos --clean-csv photos/clean.csv
"""

from __future__ import annotations

import argparse
import sys

SOURCES_HELP = """\
data sources (--source):
  cifar100n         CIFAR-100 images + CIFAR-100N human labels (default). --data-dir holds
                    cifar-100-python/ (torchvision's layout) and CIFAR-100_human.pt; whatever is
                    missing is downloaded there (the label file is checked against its sha256).
                    An existing folder is checked by structure and label alignment only.
  npz:PATH          numpy .npz with images (N,H,W,3) uint8 and labels (N,) int; optional
                    clean_labels (N,) (-1 = unknown), test_images + test_labels, class_names.
                    Without a test split, a stratified --holdout fraction becomes the test split.
  imagefolder:PATH  PATH/train/<class>/<image> (and PATH/test/<class>/<image>); images are
                    centre-cropped to a square and resized to --image-size. Optional --clean-csv.
  digits            scikit-learn's bundled 8x8 digits upscaled to 32x32 RGB, with --noise
                    injected and the true labels kept as clean_label: the offline demo.
fields written, in order: image (raw RGB), label, clean_label (-1 = unknown), index (the sample's
position, 0..N-1 in each split; for a held-out split meta.json maps it to the source's rows).
meta.json (written last) records classes, counts, noise rate and a fingerprint of the inputs and
options: an identical rerun is skipped unless --force. A killed run leaves no meta.json.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2, no usage dump
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n")[0], epilog=SOURCES_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="cifar100n", metavar="SRC",
                   help="cifar100n (default) | npz:PATH | imagefolder:PATH | digits")
    p.add_argument("--data-dir", default="data/raw", metavar="DIR",
                   help="cifar100n: folder with cifar-100-python/ and CIFAR-100_human.pt (default: %(default)s)")
    p.add_argument("--out-dir", default="data/cifar100n", metavar="OUT",
                   help="where train.beton, test.beton and meta.json go (default: %(default)s)")
    p.add_argument("--labels", choices=("noisy", "clean"), default="noisy",
                   help="cifar100n: train on the human noisy labels or the clean ones (default: %(default)s)")
    p.add_argument("--label-sha256", metavar="HEX", default=None,
                   help="cifar100n: expected sha256 of CIFAR-100_human.pt (default: the published file's)")
    p.add_argument("--no-download", action="store_true",
                   help="cifar100n: fail with a message instead of downloading missing files")
    p.add_argument("--noise", type=float, default=0.0, metavar="RATE",
                   help="inject label noise into this fraction of the training labels, e.g. 0.4 "
                        "(the original labels become clean_label; default: none)")
    p.add_argument("--noise-kind", choices=("symmetric", "pairflip"), default="symmetric",
                   help="symmetric: a uniformly drawn other class; pairflip: class c -> c+1 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the noise and the hold-out split (default: 0)")
    p.add_argument("--holdout", type=float, default=0.1, metavar="FRACTION",
                   help="test fraction held out (stratified) when a source has no test split (default: 0.1)")
    p.add_argument("--image-size", type=int, default=32, metavar="PIXELS",
                   help="imagefolder: side of the square images written (default: 32)")
    p.add_argument("--clean-csv", metavar="CSV", default=None,
                   help="imagefolder: CSV with columns path (relative to train/) and clean_label "
                        "(a class folder name) for the samples whose true class is known")
    p.add_argument("--num-classes", type=int, default=None, metavar="C",
                   help="npz: number of classes (default: len(class_names), else the largest label + 1)")
    p.add_argument("--force", action="store_true", help="rewrite even if OUT is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars (reading images and writing files)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastcifar.beton import write_dataset
    from fastcifar.sources import DataError, prepare_source

    try:
        prepared = prepare_source(
            args.source, data_dir=args.data_dir, labels=args.labels, label_sha256=args.label_sha256,
            noise=args.noise, noise_kind=args.noise_kind, seed=args.seed, holdout=args.holdout,
            image_size=args.image_size, clean_csv=args.clean_csv, num_classes=args.num_classes,
            download=not args.no_download, progress=not args.quiet)
        write_dataset(prepared, args.out_dir, force=args.force, progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing complete was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

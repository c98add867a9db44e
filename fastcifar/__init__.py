"""fastcifar: a fused-kernel trainer for learning with noisy labels."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """`fastcifar.kernels` from the `kernels/` folder beside this package, in a source checkout.

    pip installs `kernels/` as the subpackage `fastcifar.kernels` (pyproject's package-dir); a plain
    checkout (nothing installed: the GPU machines, `python scripts/gpu_report.py`) has no
    `fastcifar/kernels/`, so this finder maps the name to `../kernels/`. It goes first on
    sys.meta_path so that a checkout uses its own kernels even where another copy is installed.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != f"{__name__}.kernels":
            return None  # submodules resolve through the package's __path__ as usual
        return importlib.util.spec_from_file_location(
            fullname, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)])


_here = Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "kernels" / "__init__.py").is_file():
    sys.meta_path.insert(0, _CheckoutKernels(_here.parent / "kernels"))

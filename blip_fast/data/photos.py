"""Real JPEG photos shipped inside PyPI wheels (scikit-image, scikit-learn), for tests and
benchmarks that need camera images rather than synthetic scenes, offline."""

import importlib
import os

__all__ = ["sample_photos"]

# (package whose folder holds them, subfolder, files)
_SOURCES = (
    ("skimage", "data", ("rocket.jpg", "retina.jpg")),
    ("sklearn.datasets", "images", ("china.jpg",)),
)


def sample_photos() -> list[str]:
    """Paths of those photos whose package is installed (scikit-image, scikit-learn)."""
    found = []
    for package, folder, files in _SOURCES:
        try:
            root = os.path.join(os.path.dirname(importlib.import_module(package).__file__), folder)
        except ImportError:
            continue
        found += [p for p in (os.path.join(root, f) for f in files) if os.path.exists(p)]
    return found

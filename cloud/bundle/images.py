"""Calibration and held-out images: public, and disjoint from each other.

They must be public and disjoint from every device's data: ``public_images`` takes them from
the base's reserved alignment images (easy-VQA) plus scikit-learn's two sample photos. An image
in both sets would let a graph pass its gate on what it was calibrated on
(``check_images``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from cloud.base.build import LoadedBase
    from shared.data.base import VQATask

log = logging.getLogger(__name__)


def public_images(
    task: VQATask, *, n_calibration: int = 64, n_holdout: int = 32, photos: bool = True,
) -> tuple[list[Image.Image], list[Image.Image]]:
    """Calibration and held-out images, disjoint, from the task's reserved alignment images.

    The alignment images are public and kept out of every device's data. ``photos`` adds
    scikit-learn's two sample photos (natural images) to the held-out set when installed.
    """
    keys = [key for key, _ in task.align]
    if n_calibration < 1 or n_holdout < 1 or n_calibration + n_holdout > len(keys):
        raise ValueError(f"need 1..{len(keys)} alignment images in all, got "
                         f"n_calibration={n_calibration!r}, n_holdout={n_holdout!r}")
    load = task.load_image
    calibration = [load(key) for key in keys[:n_calibration]]
    holdout = [load(key) for key in keys[n_calibration:n_calibration + n_holdout]]
    return calibration, holdout + (_sample_photos() if photos else [])


def base_public_images(
    base: LoadedBase, *, n_calibration: int = 64, n_holdout: int = 32, photos: bool = True,
) -> tuple[list[Image.Image], list[Image.Image]]:
    """``public_images`` from the images ``base`` reserved for its alignment (easy-VQA)."""
    settings = base.manifest.get("alignment", {}).get("settings", {})
    if settings.get("task") != "easyvqa":
        raise ValueError(f"only easy-VQA-aligned bases are supported here, got task "
                         f"{settings.get('task')!r}; pass calibration images yourself")
    from shared.data.easyvqa import load_easy_vqa

    task = load_easy_vqa(n_align_images=int(settings["n_pairs"]), seed=int(settings["seed"]))
    return public_images(task, n_calibration=n_calibration, n_holdout=n_holdout, photos=photos)


def _sample_photos() -> list[Image.Image]:
    try:
        from sklearn.datasets import load_sample_images
    except ModuleNotFoundError:
        log.info("scikit-learn is not installed: held-out set without sample photos")
        return []
    return [Image.fromarray(array) for array in load_sample_images().images]


def check_images(
    calibration: Sequence[Image.Image], holdout: Sequence[Image.Image], precision: str,
) -> None:
    """``ValueError`` unless there are held-out images, calibration images for int8, and no
    image in both sets."""
    if not holdout:
        raise ValueError("the quality gate needs held-out images, got none")
    if precision == "int8" and not calibration:
        raise ValueError("int8 quantization needs calibration images, got none")
    shared = {image_digest(i) for i in calibration} & {image_digest(i) for i in holdout}
    if shared:
        raise ValueError(f"calibration and held-out images must be disjoint, got "
                         f"{len(shared)} image(s) in both")


def image_digest(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()

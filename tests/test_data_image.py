"""Image folders (ImageNet layout) for the image presets: a few training steps end to end."""

import json

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

from mvit.cli import main  # noqa: E402
from mvit.data.image import ImageFolderDataset, read_image  # noqa: E402


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                img = torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8, generator=g)
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / split / cls / f"{i}.png")
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    return root


def test_image_dataset_shapes(image_root):
    items = [(str(image_root / "val" / "cat" / "0.png"), 0)]
    x, y = ImageFolderDataset(items, 32, train=False)[0]
    assert x.shape == (1, 3, 1, 32, 32) and y == 0  # one view of a one-frame clip
    x, _ = ImageFolderDataset(items, 32, train=True, rand_augment=(7, 2), erasing=0.25)[(0, 9)]
    assert x.shape == (3, 1, 32, 32)
    assert read_image(items[0][0]).shape == (3, 40, 52)


def test_train_image_preset(image_root, tmp_path):
    out = tmp_path / "img"
    assert main(["train", "--preset", "mvitv2_t_image", "--data-root", str(image_root), "--crop-size", "64",
                 "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--threads", "1", "--no-progress",
                 "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["val"]["videos"] == 6

"""Data for every DPT stage: datasets as uint8 tensors, the labeled split, and
batched augmentation that runs on whatever device the batch lives on (the
classifier's weak and strong views, EDM's pipeline for the diffusion model); the
command line last. What every script shares besides is plumbing.py's.

    python data.py --dataset shapes            # class counts, sizes, augment.png
    python data.py --bench                     # augmented images per second, CPU and CUDA

Datasets: cifar10, cifar100, svhn (torchvision, downloaded into --data-dir),
shapes and glyphs (drawn here in seconds, no download), or a .pt/.npz file with train_x, train_y
and optionally test_x, test_y: each comes back as uint8 N x 3 x H x W images and
int64 labels, which the augmentations take and return. A folder in ImageNet's
layout is the imagenet preset's, read by imagenet.py.
"""

import itertools
import math
import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

import plumbing
from plumbing import UserError

# -----------------------------------------------------------------------------
# Datasets


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor        # uint8 [N, 3, H, W]
    train_y: torch.Tensor        # int64 [N], 0 .. num_classes-1
    test_x: torch.Tensor | None  # uint8 [M, 3, H, W], or None when the source has no test set
    test_y: torch.Tensor | None  # int64 [M]
    num_classes: int
    classes: tuple = ()          # class names, where the source has them
    train_files: tuple = ()      # a folder in ImageNet's layout: its image files (train_x and test_x None)
    test_files: tuple = ()
    root: str = ""               # ... and the folder itself, which names its files (file_records)
    skipped: tuple = ()          # ... and the files left out as unreadable (dpt.py --skip-bad-images)
    flips: bool = True           # a mirror image keeps its class (photos, shapes), so augmentation may flip


TORCHVISION_DATASETS = ("cifar10", "cifar100", "svhn")
# Datasets whose mirror images can be of another class, so augmentation never flips
# them: digits (FixMatch flips all its datasets but SVHN) and glyphs. A .pt/.npz says
# so itself (flips=True); photos, shapes and folders of images flip.
NOT_MIRRORED = ("svhn", "glyphs")


def dataset_flips(name):
    """Dataset.flips of dataset `name`, the one rule every loader and dpt.py (which
    records it before the first stage) read, without loading the images: a .npz's
    one entry, a .pt memory-mapped; False for a file that cannot be read, which
    load_dataset then refuses with the reason."""
    if not name.endswith((".pt", ".npz")):
        return name not in NOT_MIRRORED
    try:
        if name.endswith(".npz"):
            with np.load(name, allow_pickle=False) as archive:
                return "flips" in archive.files and bool(archive["flips"])
        arrays = torch.load(name, map_location="cpu", weights_only=True, mmap=True)
        return isinstance(arrays, dict) and bool(arrays.get("flips", False))
    except Exception:
        return False


def load_dataset(name, data_dir="./data"):
    """Any dataset by name (or path) as uint8 tensors in CPU memory (a folder of
    image files is imagenet.load_folder's)."""
    if name in TORCHVISION_DATASETS:
        return load_torchvision(name, data_dir)
    if name == "shapes":
        train_x, train_y = make_shapes(20_000, seed=0)
        test_x, test_y = make_shapes(2_000, seed=1)
        return Dataset("shapes", train_x, train_y, test_x, test_y, len(SHAPES), SHAPES)
    if name == "glyphs":
        (train_x, train_y), (test_x, test_y) = make_glyphs(20_000, seed=0), make_glyphs(2_000, seed=1)
        # 28x28 grayscale as RGB padded to 32x32: pixel for pixel what a file of them gives (load_file)
        return Dataset("glyphs", rgb_padded(train_x[:, None]), train_y, rgb_padded(test_x[:, None]), test_y,
                       len(GLYPHS), GLYPH_NAMES, flips=dataset_flips(name))
    if name.endswith((".pt", ".npz")):
        return load_file(name)
    if name == "imagenet" or os.path.isdir(name):
        raise UserError(f"--dataset {name}: a folder of images is read by python dpt.py --preset imagenet, "
                        "which turns it into latents and features once; this script takes pixel datasets")
    raise UserError(f"--dataset {name!r}: must be {KNOWN_DATASET[1]}")


# The rules every script's RULES shares for --dataset, --data-dir and --out.
def is_known_dataset(name):
    return (name in (*TORCHVISION_DATASETS, "shapes", "glyphs", "imagenet") or name.endswith((".pt", ".npz"))
            or os.path.isdir(name))


def is_not_a_file(path):
    return not os.path.isfile(path)


KNOWN_DATASET = (is_known_dataset,
                 f"one of {', '.join(TORCHVISION_DATASETS)}, shapes, glyphs, the path of a .pt/.npz file with "
                 "train_x and train_y, imagenet, or a folder in its layout")
NOT_A_FILE = is_not_a_file, "a folder, not a file"


def load_torchvision(name, data_dir):
    """CIFAR-10/100 and SVHN through torchvision, which downloads and checks the
    files the first time; without them and without internet we stop with where
    to put them."""
    import torchvision.datasets as tv
    if name == "svhn":
        url, folder = tv.SVHN.split_list["train"][0], data_dir
        train_split, test_split = partial(tv.SVHN, split="train"), partial(tv.SVHN, split="test")
    else:
        cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
        url, folder = cls.url, os.path.join(data_dir, cls.base_folder)
        train_split, test_split = partial(cls, train=True), partial(cls, train=False)
    try:
        with plumbing.download_timeout():
            train, test = train_split(data_dir, download=True), test_split(data_dir, download=True)
    except Exception as error:  # urllib, socket and torchvision's own errors all mean the same here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{name} is missing or corrupt in {folder} and could not be downloaded ({reason}); "
                        f"download {url} and extract it into {data_dir}, or pass --data-dir") from None

    def tensors(split):  # (images, labels); torchvision keeps SVHN as N x 3 x H x W, CIFAR as N x H x W x 3
        if name == "svhn":
            return torch.from_numpy(split.data), torch.from_numpy(split.labels).long()
        return (torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(split.targets, dtype=torch.long))
    classes = tuple(map(str, range(10))) if name == "svhn" else tuple(train.classes)  # SVHN: digits, 0 as 0
    return Dataset(name, *tensors(train), *tensors(test), len(classes), classes, flips=dataset_flips(name))


def load_file(path):
    """A .pt or .npz with train_x (uint8 N x C x H x W or N x H x W x C, C = 1 or 3),
    train_y (integers 0 .. C-1, every class present), optional test_x, test_y,
    optional classes (C names, for the report) and optional flips (true where a
    mirror image keeps its class, as in photos; unsaid, it may not: digits, letters)."""
    if not os.path.isfile(path):
        raise UserError(f"--dataset {path}: no such file")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        else:
            arrays = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(arrays, dict):
                raise UserError(f"{path} holds a {type(arrays).__name__}, not a dict with train_x and train_y")
        classes = tuple(str(name) for name in arrays.pop("classes", ()))
        arrays = {key: torch.as_tensor(value) for key, value in arrays.items()}
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"cannot read {path} ({type(error).__name__}: {str(error).splitlines()[0]}); "
                        "save a dict of arrays with torch.save or numpy.savez") from None
    if "train_x" not in arrays or "train_y" not in arrays:
        raise UserError(f"{path} has keys {sorted(arrays)} but needs train_x and train_y "
                        "(and optionally test_x, test_y)")
    if ("test_x" in arrays) != ("test_y" in arrays):
        raise UserError(f"{path} has only one of test_x and test_y: give both or neither")
    train_x, train_y = file_images(arrays["train_x"], path, "train_x"), file_labels(arrays["train_y"], path, "train_y")
    test_x = test_y = None
    if "test_x" in arrays:
        test_x, test_y = file_images(arrays["test_x"], path, "test_x"), file_labels(arrays["test_y"], path, "test_y")
    for x, y, key in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if x is not None and len(x) != len(y):
            raise UserError(f"{path}: {key}_x holds {len(x)} images but {key}_y {len(y)} labels")
    if test_x is not None and test_x.shape[1:] != train_x.shape[1:]:
        raise UserError(f"{path}: test images are {tuple(test_x.shape[1:])} but train images "
                        f"{tuple(train_x.shape[1:])}")
    num_classes = int(train_y.max()) + 1
    if num_classes > len(train_y):  # checked before anything is counted per class: a label of 10^12 allocates nothing
        raise UserError(f"{path}: train_y holds the label {num_classes - 1} but only {len(train_y):,} images, so "
                        "some classes have no training images; labels must run 0..C-1 with every class present")
    missing = (torch.bincount(train_y, minlength=num_classes) == 0).nonzero().flatten().tolist()
    if missing:
        raise UserError(f"{path}: classes {missing[:5]} have no training images; labels must run 0..C-1 "
                        "with every class present")
    if test_y is not None and int(test_y.max()) >= num_classes:
        raise UserError(f"{path}: test_y holds label {int(test_y.max())} but train_y only 0..{num_classes - 1}")
    if classes and len(classes) != num_classes:
        raise UserError(f"{path}: classes names {len(classes)} classes but train_y has {num_classes}")
    name = os.path.splitext(os.path.basename(path))[0]
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes, classes, flips=dataset_flips(path))


def file_images(x, path, key):
    if x.dtype != torch.uint8:
        largest = 0 if x.dtype.is_floating_point or x.dtype.is_complex or not x.numel() else int(x.numpy().max())
        advice = ("with (x * 255).round().astype('uint8') if it holds floats in [0, 1]" if x.dtype.is_floating_point
                  else "with (x / 257).round().astype('uint8'), as it holds 16-bit pixels (0..65535)"
                  if 255 < largest <= 65535 else "with x.astype('uint8') if it holds 0..255")
        raise UserError(f"{path}: {key} is {x.dtype} but must be uint8 (0..255); convert {advice}")
    if x.ndim == 3:  # N x H x W grayscale
        x = x[:, None]
    channels_first = x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[2] == x.shape[3]
    channels_last = x.ndim == 4 and x.shape[3] in (1, 3) and x.shape[1] == x.shape[2]
    if not (channels_first or channels_last) or len(x) == 0:
        raise UserError(f"{path}: {key} has shape {tuple(x.shape)}; expected square images as "
                        "N x C x H x W or N x H x W x C with C = 1 or 3")
    if not channels_first:
        x = x.permute(0, 3, 1, 2)
    side, x = x.shape[-1], rgb_padded(x)
    if x.shape[-1] != side:
        print(f"{path}: {key} padded with zeros from {side}x{side} to {x.shape[-1]}x{x.shape[-1]} (a multiple of 8)")
    return x


def rgb_padded(x):
    """uint8 N x C x H x W images (C = 1 or 3) as RGB, padded with zeros to a side
    that is a multiple of 8, which fits every network size: the tiny U-Net folds
    2x2 pixels and halves twice."""
    x = x.expand(-1, 3, -1, -1).contiguous()  # grayscale becomes RGB
    pad = -x.shape[-1] % 8
    before, after = pad // 2, pad - pad // 2
    return F.pad(x, (before, after, before, after)) if pad else x


def file_labels(y, path, key):
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.ndim != 1:
        raise UserError(f"{path}: {key} is {y.dtype} of shape {tuple(y.shape)}; expected a 1-d array of "
                        "integer class labels 0..C-1")
    if len(y) and int(y.min()) < 0:
        raise UserError(f"{path}: {key} holds the negative label {int(y.min())}; labels must run 0..C-1")
    return y.long()


# -----------------------------------------------------------------------------
# shapes: ten classes of shapes with noise, generated in seconds.
# Each shape is an inside-test on coordinates (u, v) in the shape's own frame,
# scaled so that the shape fits in the unit disc.

SHAPES = ("circle", "square", "triangle", "plus", "ring", "star", "half-disc", "bar", "crescent", "L")


def inside_shape(label, u, v):
    """Whether local coordinates (u, v) lie inside shape number `label`."""
    rho, phi = torch.hypot(u, v), torch.atan2(v, u)
    name = SHAPES[label]
    if name == "circle":
        return rho < 0.85
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) < 0.68
    if name == "triangle":  # equilateral, corners on the unit circle
        return (v > -0.5) & (math.sqrt(3) * u + v < 1) & (-math.sqrt(3) * u + v < 1)
    if name == "plus":
        return ((u.abs() < 0.28) & (v.abs() < 0.9)) | ((v.abs() < 0.28) & (u.abs() < 0.9))
    if name == "ring":
        return (rho > 0.55) & (rho < 0.95)
    if name == "star":  # five rounded points
        return rho < 0.6 + 0.35 * torch.cos(5 * phi)
    if name == "half-disc":
        return (rho < 0.95) & (v > -0.2)
    if name == "bar":
        return (u.abs() < 0.95) & (v.abs() < 0.3)
    if name == "crescent":
        return (rho < 0.95) & (torch.hypot(u - 0.5, v) > 0.75)
    assert name == "L"
    return ((u > -0.8) & (u < -0.3) & (v.abs() < 0.9)) | ((u.abs() < 0.8) & (v > 0.4) & (v < 0.9))


def make_shapes(n, seed, side=32, chunk=1000):
    """n images of random shapes (class, size, position, rotation) with pixel
    noise; the same images for the same seed everywhere."""
    g = torch.Generator().manual_seed(seed)
    rand = partial(torch.rand, generator=g)
    labels = torch.randint(len(SHAPES), (n,), generator=g)
    radius = side * (0.22 + 0.16 * rand(n))
    center = radius[:, None] + (side - 2 * radius[:, None]) * rand(n, 2)
    angle = math.radians(20) * (2 * rand(n) - 1)  # more rotation makes a small CNN need far longer
    # One colour pair for every image: with random colours, a net trained on ten
    # labeled images keys on colour, and on 2 CPU cores neither it nor FixMatch
    # recovers within minutes. Size, position, rotation and noise still vary.
    background = torch.tensor([0.10, 0.12, 0.25]).expand(n, 3)  # navy
    foreground = torch.tensor([0.95, 0.75, 0.20]).expand(n, 3)  # amber

    images = []
    supersample = 2  # drawn at twice the size and averaged down, for smooth edges
    coords = (torch.arange(side * supersample) + 0.5) / supersample
    for start in range(0, n, chunk):
        k = slice(start, start + chunk)
        y, x = coords.view(1, -1, 1), coords.view(1, 1, -1)
        dx, dy = x - center[k, 0, None, None], y - center[k, 1, None, None]
        cos, sin = angle[k].cos()[:, None, None], angle[k].sin()[:, None, None]
        u = (cos * dx + sin * dy) / radius[k, None, None]
        v = (-sin * dx + cos * dy) / radius[k, None, None]
        inside = torch.zeros(u.shape, dtype=torch.bool)
        for label in range(len(SHAPES)):
            mine = labels[k] == label
            inside[mine] = inside_shape(label, u[mine], v[mine])
        image = torch.where(inside[:, None], foreground[k, :, None, None], background[k, :, None, None])
        image = F.avg_pool2d(image, supersample)
        image = image + 0.02 * torch.randn(image.shape, generator=g)
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(images), labels


# -----------------------------------------------------------------------------
# glyphs: a second procedural set with other statistics than shapes (28x28
# grayscale strokes on black, classes that differ in form only), so that a recipe
# tuned on shapes can be checked on data it was not tuned on: `--dataset glyphs`,
# or a .npz of them for other tools (`python data.py --write-glyphs glyphs.npz`).


def ellipse(cx, cy, rx, ry, points=14):
    """An ellipse as a closed polyline of `points` segments."""
    return [(cx + rx * math.cos(2 * math.pi * i / points), cy + ry * math.sin(2 * math.pi * i / points))
            for i in range(points + 1)]


# Ten digit-like glyphs as polylines in a box from -1 to 1 (x right, y down).
GLYPHS = (
    [ellipse(0, 0, 0.6, 0.9)],
    [[(-0.35, -0.6), (0.1, -0.95), (0.1, 0.95)]],
    [[(-0.55, -0.5), (-0.3, -0.85), (0.2, -0.9), (0.55, -0.55), (0.45, -0.1), (-0.6, 0.9), (0.65, 0.9)]],
    [[(-0.55, -0.8), (0.4, -0.85), (0.5, -0.45), (0.0, -0.05), (0.55, 0.35), (0.4, 0.85), (-0.55, 0.85)]],
    [[(0.3, 0.95), (0.3, -0.95), (-0.6, 0.35), (0.7, 0.35)]],
    [[(0.55, -0.9), (-0.45, -0.9), (-0.5, -0.1), (0.3, -0.15), (0.6, 0.35), (0.35, 0.85), (-0.55, 0.8)]],
    [[(0.45, -0.9), (-0.3, -0.3), (-0.55, 0.4), (-0.3, 0.9), (0.35, 0.85), (0.55, 0.35), (0.2, 0.0), (-0.5, 0.3)]],
    [[(-0.6, -0.9), (0.6, -0.9), (-0.1, 0.95)]],
    [ellipse(0, -0.5, 0.4, 0.4), ellipse(0, 0.45, 0.5, 0.48)],
    [ellipse(0.05, -0.45, 0.45, 0.45), [(0.5, -0.45), (0.3, 0.95)]],
)


def make_glyphs(n, seed, side=28, chunk=1000):
    """n grayscale uint8 [n, side, side] glyphs, each under its own random affine
    map (size, rotation, shear, shift), stroke width and brightness, with noise."""
    g = torch.Generator().manual_seed(seed)
    rand = partial(torch.rand, generator=g)
    labels = torch.randint(len(GLYPHS), (n,), generator=g)
    scale = side * (0.28 + 0.1 * rand(n, 1, 1))                       # pixels per glyph unit
    angle, shear = 0.3 * (2 * rand(n, 1, 1) - 1), 0.3 * (2 * rand(n, 1, 1) - 1)
    shift = side / 2 + 2.5 * (2 * rand(n, 2, 1, 1) - 1)
    half_width = 0.8 + 0.9 * rand(n, 1, 1)                            # stroke half-width in pixels
    brightness = 0.6 + 0.4 * rand(n, 1, 1)
    coords = torch.arange(side) + 0.5
    images = []
    for start in range(0, n, chunk):
        k = slice(start, start + chunk)
        # each pixel taken back into glyph units: undo the shift, the rotation, the shear, the scale
        dx, dy = coords.view(1, 1, -1) - shift[k, 0], coords.view(1, -1, 1) - shift[k, 1]
        cos, sin = angle[k].cos(), angle[k].sin()
        u, v = (cos * dx + sin * dy) / scale[k], (-sin * dx + cos * dy) / scale[k]
        u = u - shear[k] * v
        distance = torch.full(u.shape, float("inf"))
        for label, strokes in enumerate(GLYPHS):
            mine = labels[k] == label
            for stroke in strokes:
                for (x0, y0), (x1, y1) in zip(stroke[:-1], stroke[1:]):  # distance to each segment
                    t = (((u[mine] - x0) * (x1 - x0) + (v[mine] - y0) * (y1 - y0)) /
                         ((x1 - x0) ** 2 + (y1 - y0) ** 2)).clamp(0, 1)
                    d = torch.hypot(u[mine] - x0 - t * (x1 - x0), v[mine] - y0 - t * (y1 - y0))
                    distance[mine] = torch.minimum(distance[mine], d)
        ink = (half_width[k] - distance * scale[k] + 0.5).clamp(0, 1)  # one pixel of anti-aliased edge
        image = brightness[k] * ink + 0.03 * torch.randn(ink.shape, generator=g)
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(images), labels


GLYPH_NAMES = tuple(str(digit) for digit in range(len(GLYPHS)))


def npz_writer(arrays, file):
    """save_atomic's writer of a dict of arrays as a .npz."""
    np.savez(file, **arrays)


def write_glyphs(path, train=20_000, test=2_000):
    """The glyphs dataset as a .npz that load_dataset reads like any user's file."""
    (train_x, train_y), (test_x, test_y) = make_glyphs(train, seed=0), make_glyphs(test, seed=1)
    plumbing.save_atomic({"train_x": train_x.numpy(), "train_y": train_y.numpy(), "test_x": test_x.numpy(),
                          "test_y": test_y.numpy(), "classes": np.array(GLYPH_NAMES)},
                         path, writer=npz_writer)


# -----------------------------------------------------------------------------
# The labeled split


def labeled_split(train_y, labels_per_class, seed):
    """Indices (sorted, int64) of exactly labels_per_class images of every class.
    numpy's legacy RandomState promises the same stream on every platform and
    version, so the same (dataset, labels, seed) gives the same split everywhere."""
    counts = torch.bincount(train_y)
    if labels_per_class < 1 or labels_per_class > int(counts.min()):
        raise UserError(f"--labels {labels_per_class} is not possible: give 1 to {int(counts.min())} labeled "
                        f"images per class (the smallest class has {int(counts.min())} images)")
    rng = np.random.RandomState(seed)
    y = train_y.numpy()
    chosen = [rng.permutation(np.flatnonzero(y == c))[:labels_per_class] for c in range(len(counts))]
    return torch.from_numpy(np.sort(np.concatenate(chosen))).long()


# -----------------------------------------------------------------------------
# Weak augmentation (FixMatch): random horizontal flip and a random crop of the
# image reflect-padded by 4 pixels, done as one gather per batch. No flip where a
# mirror image can be of another class (FixMatch's SVHN; a mirrored 5 is near a 2).


def reflect(i, size):
    """Indices mirrored back into 0 .. size - 1 where they fall off either edge."""
    return (size - 1) - ((size - 1) - i.abs()).abs()


def weak_augment(x, pad=4, flip=True):
    """uint8 [N, C, H, W] -> uint8 [N, C, H, W], on x's device."""
    n, c, h, w = x.shape
    shift = torch.randint(-pad, pad + 1, (n, 2), device=x.device)
    flip = (torch.rand(n, 1, device=x.device) < 0.5) & flip
    cols = torch.arange(w, device=x.device).expand(n, w)
    rows = reflect(torch.arange(h, device=x.device) + shift[:, :1], h)
    cols = reflect(torch.where(flip, w - 1 - cols, cols) + shift[:, 1:], w)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.flatten(2).gather(2, index).view(n, c, h, w)


# -----------------------------------------------------------------------------
# Strong augmentation (FixMatch): weak, then RandAugment with a random op and a
# random magnitude per image, repeated, then Cutout. Every op is computed for
# the whole batch and kept where chosen (torch.where), so a batch of any size
# costs a fixed number of kernels and never waits on the host.

# Magnitude ranges of FixMatch's RandAugment (Sohn et al. 2020, Table 12) as used
# by TorchSSL/USB for FixMatch and FreeMatch; each image draws uniformly within.
RANDAUGMENT = {
    "identity":     (0, 1),
    "autocontrast": (0, 1),
    "equalize":     (0, 1),
    "brightness":   (0.05, 0.95),   # blend factor with black
    "color":        (0.05, 0.95),   # blend factor with the grayscale image
    "contrast":     (0.05, 0.95),   # blend factor with the mean gray
    "sharpness":    (0.05, 0.95),   # blend factor with the smoothed image
    "posterize":    (4, 8),         # bits kept
    "solarize":     (0, 256),       # threshold in 0..255 levels
    "rotate":       (-30, 30),      # degrees
    "shear_x":      (-0.3, 0.3),
    "shear_y":      (-0.3, 0.3),
    "translate_x":  (-0.3, 0.3),    # fraction of the width
    "translate_y":  (-0.3, 0.3),
}


def blend(degenerate, x, factor):
    """PIL's ImageEnhance: factor 0 gives the degenerate image, 1 the original."""
    return (degenerate + factor * (x - degenerate)).clamp(0, 1)


def grayscale(x):
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # ITU-R 601, as PIL's "L"


def smooth(x):
    """PIL's SMOOTH filter, the degenerate image of Sharpness; the border stays."""
    kernel = torch.ones(3, 3, device=x.device)  # built on the device: a tensor copied from the host would
    kernel[1, 1] = 5                            # make the host wait for the GPU in every step
    kernel /= 13
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel.expand(x.shape[1], 1, 3, 3), groups=x.shape[1])
    return out


def autocontrast(x, _):
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(high > low, (x - low) / (high - low).clamp_min(1e-8), x)


def equalize(x, _):
    """PIL's ImageOps.equalize for every channel of every image at once: the
    lookup table maps each level to its cumulative count, in steps of
    (pixels - count of the last level) / 255."""
    n, c, h, w = x.shape
    levels = (x * 255).round().long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    last_level = 255 - (hist.flip(1) > 0).float().argmax(1, keepdim=True)
    step = ((h * w - hist.gather(1, last_level)) / 255).floor()
    lut = (((step / 2).floor() + hist.cumsum(1) - hist) / step.clamp_min(1)).floor().clamp(max=255)
    out = torch.where(step > 0, lut.gather(1, levels), levels.float())  # a single level stays as it is
    return out.view(n, c, h, w) / 255


def brightness(x, factor):
    return blend(torch.zeros_like(x), x, factor)


def color(x, factor):
    return blend(grayscale(x), x, factor)


def contrast(x, factor):
    return blend(grayscale(x).mean((2, 3), keepdim=True), x, factor)


def sharpness(x, factor):
    return blend(smooth(x), x, factor)


def posterize(x, bits):
    bin_width = 2 ** (8 - bits.floor())
    return (x * 255 / bin_width).floor() * bin_width / 255


def solarize(x, threshold):
    return torch.where(x * 255 >= threshold, 1 - x, x)


def affine_warp(x, angle, shear_x, shear_y, translate_x, translate_y):
    """Rotate (degrees), shear and translate (fraction of the side) every image
    by its own amounts, about the image centre, nearest neighbour, black
    outside, as PIL does. Each argument is a tensor [N]."""
    angle = angle * math.pi / 180
    theta = torch.stack([
        torch.stack([angle.cos(), -angle.sin() + shear_x, 2 * translate_x], 1),  # the grid spans [-1, 1]
        torch.stack([angle.sin() + shear_y, angle.cos(), 2 * translate_y], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


PIXEL_OPS = {"autocontrast": autocontrast, "equalize": equalize, "brightness": brightness, "color": color,
             "contrast": contrast, "sharpness": sharpness, "posterize": posterize, "solarize": solarize}
# affine_warp's arguments, last in RANDAUGMENT
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def randaugment_step(x):
    """One RandAugment op per image on float images in [0, 1], [N, C, H, W].

    The batch is shuffled and cut into 14 equal slices, one per op (which op
    gets a left-over image is drawn too), so every image's op is uniform over
    the 14, every op runs once on its own slice, and slice sizes are known on
    the host: no masks, no device-to-host sync, a fourteenth of the work of
    computing every op for every image."""
    n = x.shape[0]
    names = list(RANDAUGMENT)
    # Which ops take the n % 14 left-over images is drawn on the host's generator (no
    # sync); a batch that 14 divides (the paper's 7 x 64) has none and draws nothing,
    # so that its augmentation compiles to one graph (fixmatch.train). An empty one
    # draws, as it always has: a CPU run's random numbers stay those it had.
    offset = int(torch.randint(len(names), ())) if n % len(names) or not n else 0
    sizes = [n // len(names) + ((k - offset) % len(names) < n % len(names)) for k in range(len(names))]
    ends = dict(zip(names, itertools.accumulate(sizes)))
    starts = {name: ends[name] - size for name, size in zip(names, sizes)}
    order = torch.randperm(n, device=x.device)
    x = x[order]
    u = torch.rand(n, device=x.device)

    def magnitude(name, a, b):
        low, high = RANDAUGMENT[name]
        return low + (high - low) * u[a:b]

    for name, apply in PIXEL_OPS.items():
        a, b = starts[name], ends[name]
        if b > a:
            x[a:b] = apply(x[a:b], magnitude(name, a, b).view(-1, 1, 1, 1))
    # The geometric ops' slices are adjacent: one warp, each image with its one nonzero argument.
    first, last = starts[GEOMETRIC_OPS[0]], ends[GEOMETRIC_OPS[-1]]
    if last > first:
        arguments = torch.zeros(len(GEOMETRIC_OPS), last - first, device=x.device)
        for i, name in enumerate(GEOMETRIC_OPS):
            arguments[i, starts[name] - first:ends[name] - first] = magnitude(name, starts[name], ends[name])
        x[first:last] = affine_warp(x[first:last], *arguments)
    shuffled_back = torch.empty_like(x)
    shuffled_back[order] = x
    return (shuffled_back * 255).round() / 255  # PIL works in 8-bit levels between ops


def cutout(x, max_fraction=0.5, fill=127 / 255):
    """A gray square with side up to max_fraction of the image, centred anywhere."""
    n, _, h, w = x.shape
    side = max_fraction * w * torch.rand(n, 1, 1, device=x.device)
    cy, cx = h * torch.rand(n, 1, 1, device=x.device), w * torch.rand(n, 1, 1, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
    cols = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
    box = ((rows - cy).abs() < side / 2) & ((cols - cx).abs() < side / 2)
    return torch.where(box[:, None], fill, x)


def strong_augment(x, ops=3, flip=True):
    """uint8 [N, C, H, W] -> uint8 [N, C, H, W]: flip (where flip) and crop, `ops`
    RandAugment ops per image (3, as TorchSSL's FixMatch and FreeMatch), then Cutout."""
    x = weak_augment(x, flip=flip).float() / 255
    for _ in range(ops):
        x = randaugment_step(x)
    return (cutout(x) * 255).round().to(torch.uint8)


# -----------------------------------------------------------------------------
# EDM's augmentation of the diffusion model's images (Karras et al. 2022, Appendix
# C.4, after ADA, Karras et al. 2020): each training image draws its own
# transformation and the network is told what was drawn, so it learns the plain
# images as the zero-labels case instead of leaking augmented images into its
# samples (sampling passes no labels). unet.py's training calls it.

AUGMENT_DIM = 9  # x-flip, y-flip, scale, rotation (cos - 1, sin), anisotropy (2), translation (2)


def edm_augment(images, p, scale_std=0.2, aniso_std=0.2, translate_std=0.125, flip=True):
    """EDM's CIFAR-10 pipeline (its train.py: xflip=1e8, yflip, scale, rotate_frac,
    aniso, translate_frac at p) on float images [N, C, H, W]: an x-flip drawn for
    every image when p > 0, and each of the others with probability p: y-flip,
    scaling by 2^(0.2 n), rotation by a uniform angle, scaling by 2^(0.2 n) and
    2^(-0.2 n) along a random axis (half the time, else the x axis), translation
    by 0.125 n of the side; n ~ N(0, 1) each; no x-flip without flip. Returns the images and the labels
    [N, AUGMENT_DIM], zero wherever nothing was applied."""
    n, device = len(images), images.device

    def drawn():  # whether image i gets this op
        return (torch.rand(n, device=device) < p).float()
    xflip = torch.randint(2, (n,), device=device).float() * (p > 0 and flip)
    yflip = torch.randint(2, (n,), device=device).float() * drawn()
    images = torch.where(xflip.view(-1, 1, 1, 1) > 0, images.flip(3), images)
    images = torch.where(yflip.view(-1, 1, 1, 1) > 0, images.flip(2), images)
    scale = torch.randn(n, device=device) * drawn()
    angle = (torch.rand(n, device=device) * 2 - 1) * math.pi * drawn()
    aniso = torch.randn(n, device=device) * drawn()
    axis = (torch.rand(n, device=device) * 2 - 1) * math.pi * (torch.rand(n, device=device) < 0.5)
    shift = torch.randn(n, 2, device=device) * drawn()[:, None]
    # Each output pixel q reads the input at M (q - t), in pixels about the centre (EDM's G_inv):
    # M = scale^-1 . rotation . aniso^-1 and t the translation.
    matrix = (scaling(2 ** (-scale_std * scale), 2 ** (-scale_std * scale)) @ rotation(angle) @ rotation(-axis)
              @ scaling(2 ** (-aniso_std * aniso), 2 ** (aniso_std * aniso)) @ rotation(axis))
    moved = (scale != 0) | (angle != 0) | (aniso != 0) | (shift != 0).any(1)
    warped = warp(images, matrix, shift * translate_std * images.shape[-1])
    images = torch.where(moved.view(-1, 1, 1, 1), warped, images)
    labels = torch.stack([xflip, yflip, scale, angle.cos() - 1, angle.sin(), aniso * axis.cos(), aniso * axis.sin(),
                          shift[:, 0], shift[:, 1]], 1)
    return images, labels


def rotation(angle):  # [N, 2, 2] matrices that turn by each angle
    return torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], 1).view(-1, 2, 2)


def scaling(x, y):  # [N, 2, 2] matrices that scale by x along the first axis and by y along the second
    return torch.diag_embed(torch.stack([x, y], 1))


def warp(images, matrix, shift):
    """Output pixel q = input at matrix (q - shift) (pixels, about the image
    centre), bilinear, reflected at the border. Where the warp shrinks the image
    (matrix stretches a pixel step past one pixel), each output pixel averages its
    2 x 2 sub-pixel readings so that minification does not alias (EDM filters with
    2x wavelet up- and down-sampling to the same end); elsewhere it reads once, at
    its centre, so that the identity and integer shifts keep every pixel."""
    shrinks = largest_singular_value(matrix) > 1 + 1e-6
    return torch.where(shrinks.view(-1, 1, 1, 1), warp_readings(images, matrix, shift, 2),
                       warp_readings(images, matrix, shift, 1))


def largest_singular_value(matrix):
    """Of each 2 x 2 matrix [N, 2, 2], in closed form: s^2 = (F + sqrt(F^2 - 4 det^2)) / 2,
    F the squared Frobenius norm. torch.linalg's SVD would synchronize a GPU with
    the host (its documentation says so) in every training step."""
    frobenius = matrix.square().sum((1, 2))
    determinant = matrix[:, 0, 0] * matrix[:, 1, 1] - matrix[:, 0, 1] * matrix[:, 1, 0]
    return ((frobenius + (frobenius ** 2 - 4 * determinant ** 2).clamp_min(0).sqrt()) / 2).sqrt()


def warp_readings(images, matrix, shift, sub):
    """The bilinear readings of warp() at sub x sub points a pixel, averaged."""
    n, _, h, w = images.shape
    # sub-pixel centres (the pixel centre for sub = 1), in pixels about the image centre
    ys = (torch.arange(sub * h, device=images.device) + 0.5) / sub - h / 2
    xs = (torch.arange(sub * w, device=images.device) + 0.5) / sub - w / 2
    q = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(1, -1, 2) - shift[:, None, :]
    p = q @ matrix.transpose(1, 2)  # [N, sub^2 HW, (x, y)]
    # to grid_sample's [-1, 1] (align_corners=False)
    grid = torch.stack([p[..., 0] / (w / 2), p[..., 1] / (h / 2)], -1).view(n, sub * h, sub * w, 2)
    sampled = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return F.avg_pool2d(sampled, sub)


# -----------------------------------------------------------------------------
# Command line: dataset summary and preview, benchmark


@dataclass
class DataConfig:
    dataset: str = "cifar10"        # cifar10 | cifar100 | svhn | shapes | glyphs | a .pt/.npz file
    data_dir: str = "./data"        # where torchvision datasets are downloaded to
    out: str = "augment.png"        # preview grid: originals, weak views, strong views
    seed: int = 0                   # seed of the augmentations in the preview
    bench: bool = False             # print augmented images per second on CPU and CUDA
    write_glyphs: str = ""          # write the glyphs dataset (28x28 grayscale strokes) to this .npz and exit


def summarize(data):
    print(f"{data.name}: {data.num_classes} classes, {tuple(data.train_x.shape[1:])} uint8 images")
    for split, y in (("train", data.train_y), ("test", data.test_y)):
        if y is not None:
            counts = torch.bincount(y, minlength=data.num_classes).tolist()
            shown = counts if len(counts) <= 20 else counts[:20] + ["..."]
            print(f"  {split}: {len(y)} images, per class {shown}")


def save_image_rows(rows, path):
    """Rows of equally many uint8 images as one PNG, each image upscaled to at
    least 64 pixels so that small images are legible; written atomically."""
    import torchvision.utils
    grid = torch.cat(rows).float() / 255
    grid = F.interpolate(grid, scale_factor=max(1, 64 // grid.shape[-1]), mode="nearest")
    plumbing.save_atomic(grid, path, writer=partial(torchvision.utils.save_image, nrow=len(rows[0]), padding=2,
                                                    pad_value=1.0, format="PNG"))


def save_preview(data, path, columns=10, strong_rows=3):
    """Rows: one image of each of the first classes, its weak view, its strong views."""
    first = [int((data.train_y == c).nonzero()[0]) for c in range(min(columns, data.num_classes))]
    x = data.train_x[first]
    save_image_rows([x, weak_augment(x)] + [strong_augment(x) for _ in range(strong_rows)], path)
    print(f"saved {path}: rows are originals, weak views, {strong_rows} rows of strong views")


def augmentation_rate(augment, n, device, repeats=5):
    """Images/s of augment on a batch of n random 32x32 images on device."""
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    return plumbing.rate(partial(augment, x), n, device, repeats)


def benchmark(sizes=(("cpu", 1024), ("cuda", 65536))):
    for device, n in [(d, n) for d, n in sizes if d == "cpu" or torch.cuda.is_available()]:
        label = plumbing.device_name(device)
        for name, augment in (("weak", weak_augment), ("strong", strong_augment)):
            print(f"{name:>6} augmentation, 32x32, batch {n}, {label}: "
                  f"{augmentation_rate(augment, n, device):,.0f} images/s")


def main():
    config = plumbing.parse_config(DataConfig, __doc__)
    if config.bench:
        return benchmark()
    if config.write_glyphs:
        write_glyphs(config.write_glyphs)
        return print(f"saved {config.write_glyphs}: 20,000 + 2,000 glyphs; python dpt.py --dataset "
                     f"{config.write_glyphs} runs DPT on them")
    data = load_dataset(config.dataset, config.data_dir)
    summarize(data)
    torch.manual_seed(config.seed)
    save_preview(data, config.out)


if __name__ == "__main__":
    plumbing.run_main(main)

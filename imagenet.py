"""The imagenet preset's latent path (the paper's sec. 5.2): ImageNet is learned
through frozen networks, not from pixels. MSN's self-supervised ViT (Assran et
al. 2022) gives every image a feature, on which stages 1 and 3 fit a linear
probe; Stable Diffusion's KL-f8 autoencoder (Rombach et al. 2022) gives every
image a latent, on which stage 2 trains a U-ViT, and decodes the samples. Both
load their released checkpoints as they are. A folder in ImageNet's layout is
read here once, file by file, into those latents and features (the encoding
stage), and the Probe is the preset's learner. dpt.py's `--preset imagenet`
uses all of it; the CIFAR path none of it.

    python dpt.py --dataset imagenet --preset imagenet --autoencoder autoencoder_kl.pth
"""

import dataclasses
import os
import shutil
import sys
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import plumbing
from fixmatch import Normalize
from plumbing import UserError
from unet import SIGMA_DATA

# -----------------------------------------------------------------------------
# The ImageNet learner of the paper (its sec. 5.2): no FixMatch, but a frozen
# self-supervised ViT from MSN (Assran et al. 2022) and a multinomial logistic
# regression on its features, fit on the labeled images in stage 1 and on the
# labeled plus the generated ones in stage 3. The module names are those of
# MSN's released target_encoder (its `module.` prefix dropped), so that the
# checkpoint loads as it is.

MSN_SIZES = {
    "vitl7": dict(patch=7, width=1024, depth=24, heads=16),  # vitl7_200ep.pth.tar: one label per class
    "vitb4": dict(patch=4, width=768,  depth=12, heads=12),  # vitb4_300ep.pth.tar: two labels per class
    "tiny":  dict(patch=8, width=64,   depth=2,  heads=2),   # the same family, for CPU tests
}


class MSNBlock(nn.Module):
    """Pre-LayerNorm transformer block (timm's, as MSN's deit.py)."""

    def __init__(self, width, heads, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn, self.mlp = nn.Module(), nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, mlp_ratio * width), nn.Linear(mlp_ratio * width, width)

    def forward(self, x):
        n, length, width = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(n, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = x + self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, width))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class MSNViT(nn.Module):
    """Images [N, 3, R, R], normalized with ImageNet's mean and std -> the class
    token after the last block [N, width]: MSN's forward_blocks(images, 1), the
    feature its linear evaluation uses (before the final LayerNorm, which is why
    this network has none)."""

    def __init__(self, resolution, patch, width, depth, heads):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (resolution // patch) ** 2, width))
        self.blocks = nn.ModuleList([MSNBlock(width, heads) for _ in range(depth)])

    def forward(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x[:, 0]


MSN_URL = "https://dl.fbaipublicfiles.com/msn/{}.pth.tar"
MSN_RELEASES = {"vitl7": "vitl7_200ep", "vitb4": "vitb4_300ep"}


def load_msn(size, resolution=224, path=None, device="cpu"):
    """The frozen MSN ViT of MSN_SIZES[size] from its released checkpoint (its
    target_encoder; the projection head `fc` and the final LayerNorm, which the
    feature does not pass through, dropped): from `path`, else downloaded once
    into torch's cache."""
    if path is None:
        url = MSN_URL.format(MSN_RELEASES.get(size, size))
        try:
            with plumbing.download_timeout():
                saved = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=False)
        except Exception as error:  # offline, refused, cut short, or no such release
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
            raise UserError(f"cannot get MSN's {size} ({type(error).__name__}); download {url} to "
                            f"{cache}") from None
    try:
        if path is not None:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        weights = {name.removeprefix("module."): value for name, value in saved["target_encoder"].items()}
        network = MSNViT(resolution, **MSN_SIZES[size])
        network.load_state_dict({name: value for name, value in weights.items()
                                 if not name.startswith(("fc.", "norm."))})
    except Exception as error:
        raise UserError(f"{path or size} is not MSN's {size} checkpoint ({type(error).__name__}: "
                        f"{plumbing.first_line(error)})") from None
    return network.to(device).eval().requires_grad_(False)


def msn_subset(path, files, labels, per_class, folder):
    """The indices of the labeled images that a subset file names, one a line:
    CLASS/FILE under `folder` (the training images'), or a file name alone where no
    other class has one of that name (MSN's imagenet_subsets2/1imgs_class.txt, DPT's
    for one label a class): each image once, exactly per_class of every class."""
    with open(path) as file:
        lines = [line.strip() for line in file if line.strip()]
    under = {os.path.relpath(name, folder): i for i, name in enumerate(files)}
    by_name = {}
    for name, i in under.items():
        by_name.setdefault(os.path.basename(name), []).append(i)
    found = {line: [under[line]] if line in under else by_name.get(line, []) for line in lines}
    missing = [line for line in lines if not found[line]]
    if missing:
        raise UserError(f"--label-subset {path}: {len(missing)} of its images are not among the training "
                        f"images (e.g. {missing[0]}); give the subset of this folder")
    shared = [line for line in lines if len(found[line]) > 1]
    if shared:
        raise UserError(f"--label-subset {path} names {shared[0]}, a file name that {len(found[shared[0]])} "
                        "classes hold; write its lines as CLASS/FILE")
    index = [found[line][0] for line in lines]
    if len(set(index)) < len(index):
        seen = set()
        twice = next(line for line, i in zip(lines, index) if i in seen or seen.add(i))
        raise UserError(f"--label-subset {path} names {twice} more than once; name each labeled image once")
    index = torch.tensor(sorted(index), dtype=torch.long)
    counts = torch.bincount(labels[index], minlength=int(labels.max()) + 1)
    if (counts != per_class).any():
        raise UserError(f"--label-subset {path} names {int(counts.min())} to {int(counts.max())} images a "
                        f"class, not --labels {per_class}; give the file for {per_class}")
    return index


def probe_inputs(features):
    """MSN's preprocessing of each feature vector (cyanure's preprocess with
    centering and normalize, by rows): minus its own mean, to unit length."""
    centred = features.double() - features.double().mean(1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)


def probe_objective(weights, inputs, labels, penalty):
    """cyanure's multiclass logistic loss with an L2 penalty and no intercept:
    mean_i [logsumexp(W x_i) - (W x_i)_{y_i}] + penalty / 2 ||W||^2."""
    return F.cross_entropy(inputs @ weights.T, labels) + penalty / 2 * weights.square().sum()


def fit_probe(features, labels, num_classes, penalty, tolerance=1e-10):
    """The weights W [classes, D] that minimize probe_objective (strictly convex:
    one optimum), by L-BFGS in float64 from zero until the gradient vanishes.
    MSN and DPT take penalty = 0.0025 / the number of training images."""
    inputs = probe_inputs(features)
    weights = torch.zeros(num_classes, inputs.shape[1], dtype=torch.float64, device=inputs.device,
                          requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], lr=1, max_iter=10_000, tolerance_grad=tolerance,
                                  tolerance_change=0, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = probe_objective(weights, inputs, labels, penalty)
        loss.backward()
        return loss
    optimizer.step(closure)
    return weights.detach()


def probe_predict(weights, features, batch=65_536):
    """(labels, confidences) of the probe, on the CPU, in batches (1.28M float64
    feature rows at once would take 10 GB)."""
    labels, confidences = [], []
    for chunk in features.split(batch):
        confidence, label = (probe_inputs(chunk.to(weights.device)) @ weights.T).softmax(1).max(1)
        labels.append(label.cpu())
        confidences.append(confidence.float().cpu())
    return torch.cat(labels), torch.cat(confidences)


# MSN's view of an image: its centre crop, normalized with ImageNet's statistics.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def msn_crop(side):
    """The side of the centre crop MSN sees of an image of `side` (MSN's evaluation: 224 of 256)."""
    return round(side * 224 / 256)


@torch.no_grad()
def msn_features(msn, images, bf16=False, batch=256):
    """MSN's features [N, D] (float32, on the CPU) of uint8 images [N, 3, S, S]
    (ADM's centre crops at S, real or generated): the centre S * 7/8, normalized."""
    device = next(msn.parameters()).device
    side = images.shape[-1]
    crop = msn_crop(side)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD).to(device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bool(bf16))
    features = []
    for chunk in images.split(batch):
        top = (side - crop) // 2
        with autocast:
            features.append(msn(normalize(chunk.to(device)[:, :, top:top + crop, top:top + crop])).float().cpu())
    return torch.cat(features)


# The probe as DPT's ImageNet learner, in the shape of train() and predict():
# stage 1 fits it on the labeled images' features, stage 3 on those and the
# generated images', the oracle on every training image's true label.


def train_probe(features, labels, num_classes, probe_lambda, test=None, device="cpu"):
    """fit_probe with MSN's and DPT's penalty probe_lambda / N (N images fit on), on the
    device; returns (weights, metrics) as train() does: the test accuracy where
    test = (features, labels) is given."""
    weights = fit_probe(features.to(device), labels.to(device), num_classes, probe_lambda / len(labels))
    metrics = {"history": [], "images": len(labels)}
    if test is not None:
        metrics["accuracy"] = (probe_predict(weights, test[0])[0] == test[1]).float().mean().item()
    return weights.cpu(), metrics


# -----------------------------------------------------------------------------
# Stable Diffusion's KL-f8 autoencoder (Rombach et al. 2022): the latent space of
# the ImageNet preset. An image of side 8n in [-1, 1] becomes a 4 x n x n latent
# and back. The module names are those of the released checkpoint (LDM's
# ldm/modules/diffusionmodules/model.py, with U-ViT's and DPT's autoencoder_kl.pth),
# so that its state dict loads as it is; the diffusion model sees the latents
# scaled by LATENT_SCALE to about unit variance.

AUTOENCODER_SIZES = {
    "sd":   dict(channels=128, channel_mult=(1, 2, 4, 4), num_blocks=2),  # 83.7M: Stable Diffusion's
    "tiny": dict(channels=32,  channel_mult=(1, 2, 2, 2), num_blocks=1),  # the same family, for CPU tests
}
LATENT_CHANNELS = 4
LATENT_SCALE = 0.18215  # 1 / the standard deviation of SD's latents on its training images


def autoencoder_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class AutoencoderBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice; added to the input (1x1-projected if the width changes)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1, self.conv1 = autoencoder_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = autoencoder_norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AutoencoderAttention(nn.Module):
    """Single-head self-attention over the pixels, residual (only at the lowest resolution)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = autoencoder_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        n, c, h, w = x.shape
        normed = self.norm(x)
        q, k, v = (layer(normed).flatten(2).transpose(1, 2)[:, None] for layer in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)[:, 0]  # [n, pixels, c]
        return x + self.proj_out(a.transpose(1, 2).reshape(n, c, h, w))


def autoencoder_middle(channels):
    middle = nn.Module()
    middle.block_1, middle.attn_1, middle.block_2 = (AutoencoderBlock(channels, channels),
                                                     AutoencoderAttention(channels),
                                                     AutoencoderBlock(channels, channels))
    return middle


def autoencoder_level(blocks, resample=None):
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        setattr(level, resample, nn.Module())
        getattr(level, resample).conv = nn.Conv2d(blocks[-1].conv2.out_channels, blocks[-1].conv2.out_channels, 3,
                                                  stride=2 if resample == "downsample" else 1,
                                                  padding=0 if resample == "downsample" else 1)
    return level


class AutoencoderKL(nn.Module):
    """encode: images [N, 3, 8n, 8n] in [-1, 1] -> the mean and log-variance of
    the latent's Gaussian [N, 4, n, n] each (unscaled); decode: scaled latents
    [N, 4, n, n] -> images in about [-1, 1]."""

    def __init__(self, channels, channel_mult, num_blocks, image_channels=3):
        super().__init__()
        widths = [channels * mult for mult in channel_mult]
        self.encoder, self.decoder = nn.Module(), nn.Module()
        # Encoder: num_blocks blocks a level, a stride-2 conv between levels.
        self.encoder.conv_in = nn.Conv2d(image_channels, channels, 3, padding=1)
        self.encoder.down, width = nn.ModuleList(), channels
        for level, out in enumerate(widths):
            blocks = [AutoencoderBlock(width if i == 0 else out, out) for i in range(num_blocks)]
            self.encoder.down.append(autoencoder_level(blocks, "downsample" if level < len(widths) - 1 else None))
            width = out
        self.encoder.mid = autoencoder_middle(width)
        self.encoder.norm_out = autoencoder_norm(width)
        self.encoder.conv_out = nn.Conv2d(width, 2 * LATENT_CHANNELS, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1)
        # Decoder: the mirror, num_blocks + 1 blocks a level, nearest-neighbour
        # upsampling and a conv between levels; up[level] is stored by level.
        self.post_quant_conv = nn.Conv2d(LATENT_CHANNELS, LATENT_CHANNELS, 1)
        self.decoder.conv_in = nn.Conv2d(LATENT_CHANNELS, width, 3, padding=1)
        self.decoder.mid = autoencoder_middle(width)
        levels = []
        for level, out in reversed(list(enumerate(widths))):
            blocks = [AutoencoderBlock(width if i == 0 else out, out) for i in range(num_blocks + 1)]
            levels.insert(0, autoencoder_level(blocks, "upsample" if level > 0 else None))
            width = out
        self.decoder.up = nn.ModuleList(levels)
        self.decoder.norm_out = autoencoder_norm(width)
        self.decoder.conv_out = nn.Conv2d(width, image_channels, 3, padding=1)

    def encode(self, images):
        x = self.encoder.conv_in(images)
        for level in self.encoder.down:
            for block in level.block:
                x = block(x)
            if hasattr(level, "downsample"):
                x = level.downsample.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding
        middle = self.encoder.mid
        x = middle.block_2(middle.attn_1(middle.block_1(x)))
        moments = self.quant_conv(self.encoder.conv_out(F.silu(self.encoder.norm_out(x))))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents):
        x = self.decoder.conv_in(self.post_quant_conv(latents / LATENT_SCALE))
        middle = self.decoder.mid
        x = middle.block_2(middle.attn_1(middle.block_1(x)))
        for level in reversed(self.decoder.up):
            for block in level.block:
                x = block(x)
            if hasattr(level, "upsample"):
                x = level.upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.decoder.conv_out(F.silu(self.decoder.norm_out(x)))


@torch.no_grad()
def encode_latents(autoencoder, images, bf16=False):
    """(latents, latents of the mirror images), float16 on the CPU, of uint8
    images: the mean of the autoencoder's posterior, scaled by LATENT_SCALE to
    about unit variance and by SIGMA_DATA to EDM's (as EDM2 scales its latents)."""
    device = next(autoencoder.parameters()).device
    x = images.to(device).float() / 127.5 - 1
    with torch.autocast(device.type, torch.bfloat16, enabled=bool(bf16)):
        mean, _ = autoencoder.encode(torch.cat([x, x.flip(3)]))
    return (mean.float() * LATENT_SCALE * SIGMA_DATA).half().cpu().chunk(2)


def decode_latents(autoencoder, latents, batch=32):
    """encode_latents' inverse: images in about [-1, 1], `batch` at a time:
    a 256x256 decode keeps about 0.15 GB an image in flight (its last level holds
    128 channels at full size), so a sampler's batch of 512 at once would fill 80 GB."""
    return torch.cat([autoencoder.decode(part.float() / SIGMA_DATA) for part in latents.split(batch)])


AUTOENCODER_SOURCE = ("autoencoder_kl.pth of the stable-diffusion folder that DPT's README links "
                      "(drive.google.com/drive/folders/1yo-XhqbPue3rp5P57j6QbA5QZx6KybvP), or a Stable Diffusion "
                      "v1 checkpoint")


def load_autoencoder(path, size="sd", device="cpu"):
    """Stable Diffusion's autoencoder from autoencoder_kl.pth (its weights alone,
    as U-ViT and DPT keep them) or from a Stable Diffusion checkpoint (under
    state_dict, prefixed first_stage_model.); frozen, in eval mode."""
    if not os.path.isfile(path):
        raise UserError(f"autoencoder weights {path} do not exist; put there the {AUTOENCODER_SOURCE}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if "state_dict" in saved:
            saved = {name.removeprefix("first_stage_model."): value for name, value in saved["state_dict"].items()
                     if name.startswith("first_stage_model.")}
        network = AutoencoderKL(**AUTOENCODER_SIZES[size])
        network.load_state_dict(saved)
    except Exception as error:
        raise UserError(f"{path} is not Stable Diffusion's autoencoder ({type(error).__name__}: "
                        f"{plumbing.first_line(error)}); give the {AUTOENCODER_SOURCE}") from None
    return network.to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# ImageNet, or any folder in its layout (FOLDER/train/CLASS/*.JPEG, FOLDER/val/CLASS/*):
# too large to hold as pixels, so every image is read from its file once, by
# encode_files, into what the stages need (latents and features), chunk by chunk.

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")  # ImageFolder's


def class_images(folder, walked=None):
    """The image files under a class folder at any depth, sorted, as torchvision's
    ImageFolder finds them; a name starting with a dot (macOS's ._name.JPEG,
    .ipynb_checkpoints) is never an image or a folder of them. Links are followed
    (a class folder may live on another disk), but each file and folder is read
    once: a folder or file that `walked` (what the split's other classes hold)
    already holds under another name, a link cycle included, is refused, since it
    would count the same images twice, or in two classes."""
    walked = {} if walked is None else walked  # (device, inode) -> the path it was first found under
    found = []

    def visit(path, is_folder):
        try:
            stat = os.stat(path)
        except FileNotFoundError:  # a broken link: a file that cannot be opened, named later as such
            return
        first = walked.setdefault((stat.st_dev, stat.st_ino), path)
        if first != path:
            what = "folder" if is_folder else "file"
            raise UserError(f"{path} is the {what} {first} again (a link); it would be read twice, "
                            "or in two classes: remove the link, or copy what it points to")
    visit(folder, True)
    for parent, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in folders:
            visit(os.path.join(parent, name), True)
        images = [os.path.join(parent, name) for name in files
                  if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)]
        for path in images:
            visit(path, False)
        found += images
    return sorted(found)


def image_folder(root, split, classes=None):
    """(paths, labels int64, class names) of root/split/CLASS/**, the classes sorted
    by name, as torchvision's ImageFolder (ImageNet's wnids in their usual order);
    given `classes` (the training split's), a class folder's label is its place there.
    A training class folder without images is refused: it would be a class nothing teaches."""
    folder = os.path.join(root, split)
    found = sorted(entry.name for entry in os.scandir(folder)
                   if entry.is_dir() and not entry.name.startswith(".")) if os.path.isdir(folder) else []
    unknown = sorted(set(found) - set(classes or found))
    if unknown:
        raise UserError(f"{folder} holds classes the training images lack ({', '.join(unknown[:3])}); "
                        "remove them, or give their training images")
    paths, labels, walked = [], [], {}
    for name in found:
        files = class_images(os.path.join(folder, name), walked)
        if not files and classes is None:
            raise UserError(f"{os.path.join(folder, name)} holds no image ({', '.join(IMAGE_SUFFIXES)}); remove "
                            "the folder, or put its class's images in it")
        paths += files
        labels += [(classes or found).index(name)] * len(files)
    classes = tuple(classes or found)
    if not paths:
        raise UserError(f"{folder} holds no images in class folders; give a folder in ImageNet's layout "
                        f"({root}/{split}/CLASS/*.JPEG)")
    return paths, torch.tensor(labels), classes


def load_folder(name, data_dir="./data"):
    """A folder in ImageNet's layout as a Dataset of files: train/ and, where it
    exists, val/ (the test set). --dataset imagenet is DATA_DIR/imagenet."""
    root = os.path.join(data_dir, "imagenet") if name == "imagenet" else name
    if not os.path.isdir(os.path.join(root, "train")):
        raise UserError(f"{root} has no train/ folder; ImageNet cannot be downloaded for you: put its images in "
                        f"{root}/train/CLASS/*.JPEG (and {root}/val/CLASS/*.JPEG), or give another folder")
    train_files, train_y, classes = image_folder(root, "train")
    has_val = os.path.isdir(os.path.join(root, "val"))
    if not has_val and int(os.environ.get("RANK", 0)) == 0:
        print(f"{root} has no val/ folder: no accuracy can be measured (put images in {root}/val/CLASS/ for it)",
              file=sys.stderr)
    test_files, test_y = image_folder(root, "val", classes)[:2] if has_val else ((), None)
    return data.Dataset(os.path.basename(os.path.normpath(root)), None, train_y, None, test_y, len(classes), classes,
                        tuple(train_files), tuple(test_files), root)


def adm_center_crop(image, side):
    """ADM's centre crop (Dhariwal & Nichol 2021, guided-diffusion's center_crop_arr),
    which DPT's and U-ViT's latents use: halve with a box filter while the short
    side is at least twice `side`, resize (bicubic) to a short side of `side`, then
    crop the centre. A PIL image in, uint8 [3, side, side] out."""
    from PIL import Image
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: scaled to 8 bits, where RGB clips
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    image = image.convert("RGB")
    while min(image.size) >= 2 * side:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = side / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    top, left = (pixels.shape[1] - side) // 2, (pixels.shape[2] - side) // 2
    return pixels[:, top:top + side, left:left + side]


def read_batch(read, files):
    """(the images read(file) of `files` stacked, up to the first that cannot be
    read, or None; that file named in words, or None): a worker process's exception
    would reach the user as its traceback, without the file."""
    images = []
    for file in files:
        try:
            images.append(read(file))
        except Exception as error:
            return torch.stack(images) if images else None, f"{file} cannot be read ({type(error).__name__}: " \
                                                            f"{plumbing.first_line(error)})"
    return torch.stack(images), None


def unreadable_images(paths, threads=16):
    """(path, why) of each file among `paths` that PIL cannot open: their header
    read, not decoded (cheap), in threads."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image

    def problem(path):
        try:
            with Image.open(path) as image:
                image.size
        except Exception as error:
            return path, type(error).__name__
    with ThreadPoolExecutor(threads) as pool:
        return [found for found in pool.map(problem, paths) if found]


def without_unreadable(dataset, skip):
    """The folder dataset with every image checked before hours of encoding: its
    unreadable files named in one line (their count and the first few), or, with
    skip, left out (in dataset.skipped)."""
    bad = unreadable_images(dataset.train_files + dataset.test_files)
    if bad and not skip:
        raise UserError(f"{len(bad)} of {len(dataset.train_files) + len(dataset.test_files):,} images cannot be "
                        f"opened: {', '.join(f'{path} ({why})' for path, why in bad[:3])}{', ...' * (len(bad) > 3)}; "
                        "remove or replace them and run the same command again, or add --skip-bad-images to leave "
                        "them out")
    if not bad:
        return dataset
    left_out = {path for path, _ in bad}
    train, test = ([i for i, file in enumerate(files) if file not in left_out]
                   for files in (dataset.train_files, dataset.test_files))
    return dataclasses.replace(dataset, train_files=tuple(dataset.train_files[i] for i in train),
                               train_y=dataset.train_y[train], test_files=tuple(dataset.test_files[i] for i in test),
                               test_y=None if dataset.test_y is None else dataset.test_y[test],
                               skipped=tuple(sorted(left_out)))


def file_records(paths, root):
    """Each file as (its path under root, size in bytes, modification time in ns):
    what tells that a file changed without reading it. The encoding pass keeps
    them with what it encoded, and a rerun compares them with the folder's."""
    def record(path):
        try:
            stat = os.stat(path)
        except FileNotFoundError:  # a broken link: the link's own, a changed file
            stat = os.lstat(path)
        return os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns
    return [record(path) for path in paths]


def folder_changes(before, after, few=3):
    """What turned file_records `before` into `after`, in words, a few examples
    each: files added, removed, moved (the same name, size and time elsewhere)
    and changed; "" when nothing did."""
    old, new = ({path: (size, time) for path, size, time in records} for records in (before, after))
    removed, added = [path for path in old if path not in new], [path for path in new if path not in old]
    left = {(os.path.basename(path), old[path]): path for path in removed}
    moved = [(left.pop((os.path.basename(path), new[path])), path) for path in added
             if (os.path.basename(path), new[path]) in left]
    removed, added = list(left.values()), [path for path in added if path not in {to for _, to in moved}]
    changed = [path for path in old if path in new and old[path] != new[path]]
    kinds = [("added", added), ("removed", removed), ("moved", [f"{a} to {b}" for a, b in moved]),
             ("changed", changed)]
    return "; ".join(f"{len(paths)} {kind} ({', '.join(paths[:few])}{', ...' * (len(paths) > few)})"
                     for kind, paths in kinds if paths)


def joined_chunk(parts, records, start, done):
    """A chunk's encoded parts as one {name: tensor}, with the records of its `done`
    files from `start` under "files" (none without records)."""
    return {**{key: torch.cat([part[key] for part in parts]) for key in parts[0]},
            **({} if records is None else {"files": records[start:start + done]})}


def encode_files(paths, read, encode, folder, chunk=10_000, batch=256, progress=True, workers=0, rank=0, world=1,
                 records=None):
    """{name: tensor [len(paths), ...]} of encode(read(images)) for every file,
    computed batch by batch and saved in chunks of `chunk` files
    (folder/chunk-00000.pt, ...): a killed pass keeps every finished chunk and
    the same call resumes at the first missing one. read(path) -> a tensor, in
    `workers` processes (JPEG decoding is the CPU's work); encode(stacked
    tensors) -> {name: tensor}, moved to the CPU here. Given the files' records
    (file_records), a chunk keeps its files' and is encoded again when they
    changed, and the whole comes back with them under "files". Process `rank` of
    `world` encodes chunks rank, rank + world, ...; rank 0 returns the whole, the others None.
    A file that cannot be read ends the pass naming it; what its chunk encoded before
    it is kept (chunk-00000.part.pt), and the same call goes on from that file."""
    from tqdm import tqdm
    starts = range(0, len(paths), chunk)
    names = [os.path.join(folder, f"chunk-{i // chunk:05d}.pt") for i in starts]
    current = [os.path.exists(name) and (records is None or torch.load(name, mmap=True, weights_only=True).get(
        "files") == records[start:start + chunk]) for start, name in zip(starts, names)]
    if rank == 0 and progress and not all(current) and any(map(os.path.exists, names)):
        print(f"encoding {sum(not done for done in current)} chunks of {chunk:,} files, {folder}: "
              "those whose files changed since they were encoded again", file=sys.stderr)
    bar = tqdm(total=len(paths), initial=min(chunk * sum(current), len(paths)), desc="encoding", unit="img",
               disable=not progress or rank > 0)
    for index, (start, name) in enumerate(zip(starts, names)):
        if current[index] or index % world != rank:
            continue
        kept, parts = name.removesuffix(".pt") + ".part.pt", []
        if os.path.exists(kept):
            saved = torch.load(kept, weights_only=True)
            files = saved.pop("files", None)
            if records is None or files == records[start:start + len(files)]:
                parts.append(saved)
        done = len(next(iter(parts[0].values()))) if parts else 0
        bar.update(done)
        loader = torch.utils.data.DataLoader(paths[start + done:start + chunk], batch_size=batch, num_workers=workers,
                                             collate_fn=partial(read_batch, read))
        for images, failure in loader:
            if images is not None:
                parts.append({key: value.cpu() for key, value in encode(images).items()})
                bar.update(len(images))
                done += len(images)
            if failure:
                if parts:
                    plumbing.save_atomic(joined_chunk(parts, records, start, done), kept)
                raise UserError(f"{failure}; remove or replace it and run the same command again (what was "
                                "encoded before it is kept)")
        plumbing.save_atomic(joined_chunk(parts, records, start, done), name)
        if os.path.exists(kept):
            os.remove(kept)
    bar.close()
    if dist.is_initialized():
        dist.barrier()  # every rank's chunks are written
    if rank > 0:
        return None
    chunks = [torch.load(name, map_location="cpu", weights_only=True) for name in names]
    whole = {key: torch.cat([part[key] for part in chunks]) for key in chunks[0] if key != "files"}
    return whole if records is None else {**whole, "files": records}


# -----------------------------------------------------------------------------
# The imagenet preset (the paper's sec. 5.2): ImageNet, or any folder in its
# layout, too large to hold as pixels, is read once into Stable Diffusion's
# latents (stage 2's data) and MSN's features (the probe's). Stages 1 and 3 fit
# the probe, stage 2 trains a U-ViT on the latents, and the samples are decoded
# and seen by MSN as the real images are. The same run folder, resume and redo.

LATENT_FIELDS = ("image_size", "autoencoder", "autoencoder_size", "msn_size", "msn_weights", "probe_lambda",
                 "label_subset", "fid_stats", "skip_bad_images")


def check_latent(config):
    """Refuse what the imagenet preset cannot run, before any work."""
    if not config.autoencoder and not config.bench:  # --bench times random weights
        raise UserError(f"--preset imagenet needs --autoencoder PATH: the {AUTOENCODER_SOURCE}")
    crop, patch = msn_crop(config.image_size), MSN_SIZES[config.msn_size]["patch"]
    if config.msn_size in MSN_RELEASES and crop != 224:  # its position embeddings are for 224 x 224
        raise UserError(f"--image-size {config.image_size}: MSN's released {config.msn_size} sees 224x224 "
                        f"centre crops of 256x256 images, not {crop}x{crop}; give --image-size 256")
    if crop % patch:
        raise UserError(f"--image-size {config.image_size}: MSN's {config.msn_size} sees a centre crop of "
                        f"{crop}, not a multiple of its patch {patch}; give a side whose 7/8 it divides (256)")


def msn_for(config, device):
    """MSN as config sets it (--msn-size, --image-size's crop, --msn-weights)."""
    return load_msn(config.msn_size, msn_crop(config.image_size), config.msn_weights or None,
                    device)


def read_image(config, file):
    from PIL import Image
    with Image.open(file) as image:
        return adm_center_crop(image, config.image_size)


def encoder(autoencoder, msn, bf16):
    """encode(uint8 images, latents=True) -> MSN's features and (with latents)
    the latents of each image and of its mirror."""
    def encode(images, latents=True):
        encoded = {"features": msn_features(msn, images, bf16)}
        if latents:
            encoded["latents"], encoded["flipped"] = encode_latents(autoencoder, images, bf16)
        return encoded
    return encode


def stage_encode(config, run, dataset, device):
    """Every training image and its mirror as a latent (the autoencoder's mean,
    scaled to EDM's sigma_data) and every image, training and val, as an MSN
    feature: each file read once, in resumable chunks (encoded/) shared out among
    the processes, then encoded.pt."""
    path = os.path.join(run, "encoded.pt")
    records = {split: file_records(files, dataset.root) for split, files in
               (("train", dataset.train_files), ("test", dataset.test_files))}  # what each encoding comes from

    def make():
        rank, world = plumbing.dist_rank(), dist.get_world_size() if dist.is_initialized() else 1
        encode = encoder(load_autoencoder(config.autoencoder, config.autoencoder_size, device),
                         msn_for(config, device), config.bf16)
        read = partial(read_image, config)
        workers = min(16, os.cpu_count() or 1) if device.type == "cuda" else 0  # JPEG decoding keeps a GPU fed
        folder = os.path.join(run, "encoded")
        passes = [("train", dataset.train_files, encode), ("test", dataset.test_files, partial(encode, latents=False))]
        train, test = (encode_files(files, read, how, os.path.join(folder, split), workers=workers, rank=rank,
                                    world=world, records=records[split]) if files else None
                       for split, files, how in passes)
        if rank == 0:
            plumbing.save_atomic({"train": train, "test": test}, path)
            shutil.rmtree(folder)
    # One kept from an earlier command was made from the folder's files as they are (check_kept).
    return plumbing.once(path, make, partial(plumbing.read_artifact, redo="encode", mmap=True), timed=(run, "encode"))


class Probe:
    """The imagenet preset's learner: a linear probe on the MSN features of the
    labeled images (and of the samples: stage 3), each into run/STAGE/probe.pt; the
    oracle is the probe fit on every training image's true label (no network to
    train: cheap), into run/oracle.pt, removed with the last stage's files."""

    def __init__(self, config, run, dataset, encoded, device):
        self.config, self.run, self.dataset, self.encoded, self.device = config, run, dataset, encoded, device

    def fit(self, stage, labeled_index, samples=None):
        """(weights, metrics) of the stage."""
        return self.fit_into(os.path.join(self.run, stage, "probe.pt"), stage, labeled_index, samples,
                             timed=(self.run, stage))

    def fit_into(self, path, redo, index, samples, timed=None):
        """The probe on the features of the training images `index` picks (and of
        the samples), into `path` once; a damaged file is remade by --redo `redo`."""
        def make():
            features, labels = self.encoded["train"]["features"][index], self.dataset.train_y[index]
            if samples is not None:  # the generated images join the labeled ones
                features, labels = torch.cat([features, samples["features"]]), torch.cat([labels, samples["labels"]])
            test = None if self.encoded["test"] is None else (self.encoded["test"]["features"], self.dataset.test_y)
            weights, metrics = train_probe(features, labels, self.dataset.num_classes,
                                           self.config.probe_lambda, test, self.device)
            plumbing.save_atomic({"weights": weights, "metrics": metrics}, path)
        saved = plumbing.once(path, make, partial(plumbing.read_artifact, redo=redo), every_rank=False, timed=timed)
        return saved["weights"], saved["metrics"]

    def predict_training(self, weights):
        return probe_predict(weights, self.encoded["train"]["features"])

    def predict_samples(self, weights, samples):
        return probe_predict(weights, samples["features"])[0]

    def embed_test(self, weights):  # the probe reads frozen MSN features: the oracle's features are those
        return None if self.encoded["test"] is None else self.encoded["test"]["features"].float()

    def embed_samples(self, weights, samples):
        return samples["features"].float()

    def oracle(self):
        path = os.path.join(self.run, "oracle.pt")
        return (*self.fit_into(path, "fid", slice(None), None), path)

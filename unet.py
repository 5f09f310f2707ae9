r"""Stage 2 of DPT: a class-conditional diffusion model trained on the pseudo
labels of stage 1, in the EDM formulation (Karras et al. 2022) with a DDPM++
U-Net (Song et al. 2021) or a U-ViT (Bao et al. 2023) as the network.

    python unet.py --dataset shapes --size tiny --images 48000 --batch 32 --lr 2e-3 --warmup 1000 \
        --ema-halflife 4000 --p-mean 0 --label-dropout 0.1 --augment 0
    python unet.py --dataset cifar10 --labels-file pseudo_labels.pt     # EDM's CIFAR-10 recipe: 200M images
    python unet.py --bench --arch uvit                                  # images/s and MFU of every size

The first command (the tiny preset's stage 2, on true labels) draws the ten
shapes, rough at the edges, with guidance 3 (sample.py; the label dropout makes
it possible); the second is EDM's run of about 2 days on 8 V100s.

Training lengths, warm-up, EMA half-life and the intervals are counted in
images, as in EDM, so they do not change meaning with the batch size. Labels
are dropped to a null class (index num_classes) with probability
--label-dropout, so that one network is both conditional and unconditional and
sample.py can guide it without a classifier (Ho & Salimans 2022). With stage 1's
labels, --confident S keeps in each class the share S of them stage 1 is surest
of and trains the other images as the null class too (the tiny preset: S = 0.5).

For the imagenet preset the U-ViT learns Stable Diffusion's latents instead of
pixels (Rombach et al. 2022; the autoencoder is imagenet.py's).
"""

import copy
import math
import os
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import data
import plumbing
from plumbing import UserError

# -----------------------------------------------------------------------------
# Configuration: EDM's CIFAR-10 recipe (Karras et al. 2022, Table 7) by default


@dataclass
class DiffusionConfig:
    dataset: str = "cifar10"        # cifar10 | cifar100 | svhn | shapes | glyphs | a .pt/.npz file
    data_dir: str = "./data"        # where torchvision datasets are downloaded to
    labels_file: str = ""           # pseudo_labels.pt of stage 1; "" trains on the dataset's true labels
    out: str = "runs/diffusion"     # folder for ckpt.pt and diffusion.pt
    arch: str = "unet"              # unet (DDPM++) | uvit (U-ViT)
    size: str = "cifar"             # tiny | fast | cifar (uvit also large, huge): a row of SIZES
    dropout: float = -1.0           # dropout probability; negative: the size's own (0.13 for the cifar U-Net)
    images: int = 200_000_000       # training length, in images
    batch: int = 512                # images per step, all processes together
    micro_batch: int = 0            # images per forward pass on a process (0: its whole share of --batch);
                                    # gradients accumulate over the micro-batches to the batch's
    lr: float = 1e-3                # Adam's learning rate after the warm-up
    warmup: int = 10_000_000        # images over which the learning rate ramps up linearly from 0
    ema_halflife: int = 500_000     # half-life of the EMA of the weights, in images
    ema_rampup: float = 0.05        # the half-life is at most this share of the images seen so far; 0: off
    label_dropout: float = 0.0      # share of labels replaced by the null class (for classifier-free guidance)
    confident: float = 1.0          # with --labels-file: the share of each class's pseudo labels kept, those
                                    # stage 1 is surest of; the rest train as the null class
    augment: float = 0.12           # EDM's augmentation probability; 0: horizontal flips only
    flip: bool = None               # mirror images in training (unset: where a mirror keeps the class)
    p_mean: float = -1.2            # training noise levels: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2              # (EDM's log-normal)
    seed: int = 0                   # seed of the initial weights and of training
    ckpt_every: int = 0             # images between checkpoints (0: every 5% of the run, at most 2M apart)
    compile: bool = None            # torch.compile the network and its loss (unset: with CUDA only)
    cuda_graphs: bool = False       # with compile on one GPU: replay the step's forward and backward as CUDA graphs
    bf16: bool = None               # bf16 autocast (unset: with CUDA only)
    bench: bool = False             # print images/s and MFU of every size of --arch and exit


# A resumed run ends the same whatever these are (a step draws its noise for the
# whole batch before splitting it into micro-batches); the labels are compared by their
# contents (a checksum in the checkpoint), not by the name of their file.
FREE_TO_CHANGE = {"data_dir", "out", "ckpt_every", "compile", "cuda_graphs", "bench", "labels_file", "micro_batch"}

# Sizes: `cifar` is EDM's DDPM++ for CIFAR-10 (55.7M parameters) and U-ViT-S/2
# (Bao et al. 2023, 44M + the time MLP); `tiny` trains on 2 CPU cores in minutes:
# its U-Net folds 2x2 pixels into channels (patch=2), so its levels run at 16, 8 and
# 4 pixels a side on 32x32 images, at 3.5x the images/s of patch=1 on 2 CPU cores.
# U-Net attention is given by level (level 1 = half the side of level 0, 16x16 at 32x32), where
# EDM names resolutions (attn_resolutions=[16]): the same layers at 32x32, and any size works.
SIZES = {
    "unet": {
        "tiny":  dict(model_channels=32,  channel_mult=(1, 2, 2), num_blocks=1, attention_levels=(2,), dropout=0.0,
                      patch=2),
        "fast":  dict(model_channels=128, channel_mult=(1, 2, 2), num_blocks=2, attention_levels=(1,), dropout=0.1),
        "cifar": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attention_levels=(1,), dropout=0.13),
    },
    "uvit": {
        "tiny":  dict(width=128, depth=5,  heads=4, patch=2, dropout=0.0),
        "fast":  dict(width=384, depth=9,  heads=6, patch=2, dropout=0.0),
        "cifar": dict(width=512, depth=13, heads=8, patch=2, dropout=0.0),
        # On Stable Diffusion's 4 x 32 x 32 latents of 256 x 256 images (the imagenet preset):
        # U-ViT-L/2 (DPT's configs for one and two labels per class) and U-ViT-H/2 (Bao et al. 2023,
        # Table 1; DPT's second config for two labels, whose U-ViT drops the last 3x3 convolution, ours keeps it).
        "large": dict(width=1024, depth=20, heads=16, patch=2, dropout=0.0, checkpoint=True),
        "huge":  dict(width=1152, depth=28, heads=16, patch=2, dropout=0.0, checkpoint=True),
    },
}
PIXEL_SIZES = tuple(SIZES["unet"])  # the sizes of both architectures, for images


# -----------------------------------------------------------------------------
# EDM's formulation (Karras et al. 2022): the denoiser's preconditioning (Table 1,
# eq. 7) and the training loss (eq. 2, 8). Everything else in this file is a
# network F inside it, or the loop that trains it.

SIGMA_DATA = 0.5  # standard deviation of images scaled to [-1, 1] (EDM's sigma_data)


class EDMPrecond(nn.Module):
    """The denoiser D(x; sigma, class) = c_skip x + c_out F(c_in x; c_noise, class),
    with the coefficients chosen so that F's input and training target both
    have unit variance at every noise level (Table 1)."""

    def __init__(self, net, num_classes, resolution, channels):
        super().__init__()
        self.net = net
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        self.sigma_data = SIGMA_DATA

    def forward(self, x, sigma, class_labels, augment_labels=None):
        """x: float [N, C, H, W] in [-1, 1] units, plus noise; sigma: [N] or one
        value; class_labels: int64 [N], num_classes for none; augment_labels:
        [N, data.AUGMENT_DIM] in training with augmentation, else None. Returns float32."""
        x = x.float()
        sigma = (torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
                 .flatten().expand(len(x)).reshape(-1, 1, 1, 1))
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4
        return c_skip * x + c_out * self.net(c_in * x, c_noise, class_labels, augment_labels).float()


def edm_noise(images, labels, null_class, config):
    """One training step's draws for the whole batch, (noisy images, sigma, labels):
    ln(sigma) ~ N(P_mean, P_std^2), the noise n ~ N(0, sigma^2), and labels replaced
    by the null class with probability label_dropout. Drawn once a step, so that
    splitting the step into micro-batches changes no number it draws."""
    sigma = (torch.randn(len(images), 1, 1, 1, device=images.device) * config.p_std + config.p_mean).exp()
    noise = torch.randn_like(images) * sigma
    dropped = torch.rand(len(labels), device=labels.device) < config.label_dropout
    return images + noise, sigma, torch.where(dropped, null_class, labels)


def edm_loss(net, images, noisy, sigma, labels, augment_labels=None):
    """EDM's training loss (eq. 8): lambda(sigma) ||D(y + n; sigma) - y||^2 with
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, which gives F
    a unit-weighted target at every sigma; noisy, sigma and labels from edm_noise.
    The network is told augment_labels, what augmentation made `images` (EDM's
    loss.py does the same). The mean over pixels replaces EDM's sum: Adam does not see the scale."""
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    denoised = net(noisy, sigma.flatten(), labels, augment_labels)
    return (weight * (denoised - images) ** 2).mean()


# -----------------------------------------------------------------------------
# DDPM++ U-Net (Song et al. 2021) as configured in EDM: GroupNorm + SiLU
# residual blocks, the noise and class embedding added inside every block,
# single-head self-attention, a skip from every encoder block to the decoder.


def xavier(layer, gain=1.0):
    """DDPM++'s initialization: Xavier-uniform weights times gain, zero biases.
    A gain of 1e-5 on the last layer of a residual branch starts it near zero."""
    nn.init.xavier_uniform_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels):
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


def positional_embedding(c_noise, channels):
    """Transformer sinusoids of c_noise, frequencies 1 down to 1/10000 (DDPM++)."""
    half = channels // 2
    freqs = (1 / 10000) ** (torch.arange(half, device=c_noise.device, dtype=c_noise.dtype) / (half - 1))
    angles = c_noise[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], 1)  # EDM concatenates cos first: a permutation, same network


RESAMPLE = {None: nn.Identity(), "down": partial(F.avg_pool2d, kernel_size=2),  # DDPM++'s [1, 1] filter
            "up": partial(F.interpolate, scale_factor=2, mode="nearest")}
SKIP_SCALE = math.sqrt(0.5)  # a sum of two unit-variance branches, scaled back to unit variance


class UNetBlock(nn.Module):
    """GroupNorm, SiLU, (resample,) 3x3 conv, + embedding, GroupNorm, SiLU,
    dropout, 3x3 conv; added to the (resampled, projected) input; then
    optionally single-head self-attention over all pixels, also residual."""

    def __init__(self,
                 in_channels,           # channels of the input
                 out_channels,          # channels of the output
                 emb_channels,          # size of the noise + class embedding
                 resample=None,         # None | "down" (halve the side) | "up" (double it)
                 attention=False,       # self-attention after the residual block
                 dropout=0.0):          # dropout before the second convolution
        super().__init__()
        self.resample, self.attention, self.dropout = resample, attention, dropout
        self.norm0 = group_norm(in_channels)
        self.conv0 = xavier(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = xavier(nn.Linear(emb_channels, out_channels))
        self.norm1 = group_norm(out_channels)
        self.conv1 = xavier(nn.Conv2d(out_channels, out_channels, 3, padding=1), gain=1e-5)
        self.skip = None
        if in_channels != out_channels or resample:
            self.skip = xavier(nn.Conv2d(in_channels, out_channels, 1))
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = xavier(nn.Conv2d(out_channels, 3 * out_channels, 1), gain=math.sqrt(0.2))
            self.proj = xavier(nn.Conv2d(out_channels, out_channels, 1), gain=1e-5)

    def forward(self, x, emb):
        resample = RESAMPLE[self.resample]
        h = self.conv0(resample(F.silu(self.norm0(x))))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = (h + (self.skip(resample(x)) if self.skip is not None else x)) * SKIP_SCALE
        if self.attention:
            n, c, height, width = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(n, 3, 1, c, height * width).transpose(3, 4).unbind(1)
            a = F.scaled_dot_product_attention(q, k, v)  # [n, 1 head, pixels, c]
            x = (self.proj(a.transpose(2, 3).reshape(n, c, height, width)) + x) * SKIP_SCALE
        return x


class UNet(nn.Module):
    """F(c_in x; c_noise, class) of EDM's `ddpmpp` with the `standard` encoder
    and decoder: every encoder output is concatenated to one decoder block."""

    def __init__(self,
                 channels,              # colour channels in and out (any side that unet.check admits)
                 num_classes,           # class labels 0..num_classes-1, and num_classes = none
                 model_channels,        # channels of the first level, and of the noise embedding
                 channel_mult,          # channels of each level, in units of model_channels
                 num_blocks,            # residual blocks per level in the encoder (+1 in the decoder)
                 attention_levels,      # levels with self-attention (0 = the first level)
                 dropout,               # dropout inside the residual blocks
                 patch=1,               # the first level works on patch x patch pixels folded into channels
                 augment_dim=0):        # size of the augmentation labels it is told (0: none)
        super().__init__()
        self.model_channels, self.patch = model_channels, patch
        emb_channels = 4 * model_channels
        # Class c adds row c to the noise embedding; the null class's row starts at
        # zero, as EDM's dropped one-hot label (its Linear of a zero vector is the bias).
        self.label_embedding = nn.Embedding(num_classes + 1, model_channels)
        bound = math.sqrt(num_classes) * math.sqrt(6 / (num_classes + model_channels))  # EDM's one-hot * sqrt(C)
        nn.init.uniform_(self.label_embedding.weight, -bound, bound)
        nn.init.zeros_(self.label_embedding.weight[num_classes])
        # EDM's map_augment: what the augmentation did, added to the noise embedding (zero at sampling).
        self.augment_embedding = nn.Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = xavier(nn.Linear(model_channels, emb_channels))
        self.map_layer1 = xavier(nn.Linear(emb_channels, emb_channels))

        block = partial(UNetBlock, emb_channels=emb_channels, dropout=dropout)
        # patch > 1 folds each patch x patch square into channels (pixel unshuffle) before the
        # stem and unfolds the output: every level then works at 1/patch of the side, for
        # patch^2 fewer FLOPs, while the model still denoises full-resolution images.
        self.stem = xavier(nn.Conv2d(channels * patch ** 2, model_channels, 3, padding=1))
        skips, width = [model_channels], model_channels  # channels of every encoder output
        self.encoder = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.encoder.append(block(width, width, resample="down"))
                skips.append(width)
            for _ in range(num_blocks):
                self.encoder.append(block(width, model_channels * mult, attention=level in attention_levels))
                width = model_channels * mult
                skips.append(width)
        self.middle = nn.ModuleList([block(width, width, attention=True), block(width, width)])
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            if level < len(channel_mult) - 1:
                self.decoder.append(block(width, width, resample="up"))
            for i in range(num_blocks + 1):
                attention = level in attention_levels and i == num_blocks
                self.decoder.append(block(width + skips.pop(), model_channels * mult, attention=attention))
                width = model_channels * mult
        self.out_norm = group_norm(width)
        self.out_conv = xavier(nn.Conv2d(width, channels * patch ** 2, 3, padding=1), gain=1e-5)

    def forward(self, x, c_noise, class_labels, augment_labels=None):
        emb = positional_embedding(c_noise, self.model_channels) + self.label_embedding(class_labels)
        if self.augment_embedding is not None and augment_labels is not None:
            emb = emb + self.augment_embedding(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        x = self.stem(F.pixel_unshuffle(x, self.patch))
        skips = [x]
        for block in self.encoder:
            x = block(x, emb)
            skips.append(x)
        for block in self.middle:
            x = block(x, emb)
        for block in self.decoder:
            x = block(x if block.resample == "up" else torch.cat([x, skips.pop()], 1), emb)
        return F.pixel_shuffle(self.out_conv(F.silu(self.out_norm(x))), self.patch)


# -----------------------------------------------------------------------------
# U-ViT (Bao et al. 2023): a ViT over 2x2 patches in which the noise level and
# the class are tokens too, with long skips from each shallow block to its
# mirror among the deep ones and a 3x3 convolution after the last layer.


class UViTBlock(nn.Module):
    """Pre-LayerNorm transformer block; a deep block first merges its long skip
    by a linear layer on the concatenation (Bao et al. 2023, sec. 3)."""

    def __init__(self, width, heads, long_skip, dropout, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        self.skip_linear = nn.Linear(2 * width, width) if long_skip else None
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], 2))
        n, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, width)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """F(c_in x; c_noise, class) as a U-ViT: tokens [noise, class, patches...]."""

    def __init__(self,
                 resolution,            # side of the (square) images, a multiple of patch
                 channels,              # colour channels in and out
                 num_classes,           # class labels 0..num_classes-1, and num_classes = none
                 width,                 # token size
                 depth,                 # transformer blocks: depth // 2 shallow, one middle, depth // 2 deep
                 heads,                 # attention heads
                 patch,                 # side of the square patches
                 dropout,               # dropout inside the MLPs
                 augment_dim=0,         # size of the augmentation labels it is told (0: none)
                 checkpoint=False):     # recompute each block's activations in backward instead of keeping them
        super().__init__()
        self.width, self.patch, self.checkpoint = width, patch, checkpoint
        self.patch_embed = nn.Conv2d(channels, width, patch, stride=patch)
        # An MLP on the sinusoids (U-ViT's mlp_time_embed): c_noise = ln(sigma)/4 spans only about
        # 4 units, so most sinusoids barely move and a linear read-out of them is weak.
        self.time_embed = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        self.label_embedding = nn.Embedding(num_classes + 1, width)
        # the augmentation labels are added into the noise token
        self.augment_embedding = nn.Linear(augment_dim, width, bias=False) if augment_dim else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + (resolution // patch) ** 2, width))
        self.in_blocks = nn.ModuleList([UViTBlock(width, heads, False, dropout) for _ in range(depth // 2)])
        self.mid_block = UViTBlock(width, heads, False, dropout)
        self.out_blocks = nn.ModuleList([UViTBlock(width, heads, True, dropout) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(width)
        self.decoder_pred = nn.Linear(width, patch * patch * channels)
        self.final_conv = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():  # U-ViT's (and ViT's) initialization of linear layers
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x, c_noise, class_labels, augment_labels=None):
        n, c, h, w = x.shape
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        time_token = self.time_embed(positional_embedding(c_noise, self.width))
        if self.augment_embedding is not None and augment_labels is not None:
            time_token = time_token + self.augment_embedding(augment_labels)
        x = torch.cat([time_token[:, None], self.label_embedding(class_labels)[:, None], patches], 1) + self.pos_embed
        # U-ViT's use_checkpoint, as its ImageNet models train: a block keeps only its
        # input for backward and recomputes the rest (about a third more compute).
        run = (partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
               if self.checkpoint and torch.is_grad_enabled() else nn.Module.__call__)
        skips = []
        for block in self.in_blocks:
            x = run(block, x)
            skips.append(x)
        x = run(self.mid_block, x)
        for block in self.out_blocks:
            x = run(block, x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, 2:]  # the noise and class tokens are not pixels
        p = self.patch  # each token's p * p * c outputs back to its patch
        x = x.reshape(n, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
        return self.final_conv(x)


ARCHITECTURES = {"unet": UNet, "uvit": UViT}


# -----------------------------------------------------------------------------
# A diffusion model: built from SIZES, saved as stage 2's artifact, loaded back


def make_diffusion(arch, size, num_classes, resolution, channels=3, dropout=None, augment_dim=0):
    """An EDMPrecond around a fresh network of SIZES[arch][size]."""
    shape = dict(SIZES[arch][size], augment_dim=augment_dim, **({} if dropout is None else {"dropout": dropout}))
    side = {"resolution": resolution} if arch == "uvit" else {}  # its position table has a row a patch
    return EDMPrecond(ARCHITECTURES[arch](channels=channels, num_classes=num_classes, **side, **shape),
                      num_classes, resolution, channels)


def save_diffusion(model, config, metrics, path):
    """Stage 2's artifact: the EMA weights and what rebuilds their network."""
    plumbing.save_atomic({"model": model.state_dict(), "config": asdict(config), "num_classes": model.num_classes,
                          "resolution": model.resolution, "channels": model.channels, "metrics": metrics}, path)


def load_diffusion(path, device="cpu"):
    """The EMA network of a diffusion.pt or of a training ckpt.pt, in eval mode."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        weights = saved["ema"] if "ema" in saved else saved["model"]
        told = any("augment_embedding" in name for name in weights)  # trained with augmentation labels
        model = make_diffusion(saved["config"]["arch"], saved["config"]["size"], saved["num_classes"],
                               saved["resolution"], saved["channels"], augment_dim=data.AUGMENT_DIM if told else 0)
        model.load_state_dict(weights)
        model.label_dropout = saved["config"]["label_dropout"]  # guidance needs a learned null class
    except Exception as error:
        raise UserError(f"cannot read a diffusion model from {path} ({type(error).__name__}); give the "
                        "diffusion.pt or ckpt.pt of unet.py, or delete a damaged one to train it again") from None
    return model.to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Training


def is_dropout(value):  # negative: the size's own
    return -math.inf < value < 1


def is_share(value):
    return 0 < value <= 1


RULES = {"dataset": data.KNOWN_DATASET, "data_dir": data.NOT_A_FILE, "out": data.NOT_A_FILE,
         "arch": plumbing.one_of(*SIZES),
         "size": plumbing.one_of(*SIZES["uvit"]),  # the U-Net's sizes are the U-ViT's pixel sizes
         "dropout": (is_dropout, "below 1 (negative: the size's own)"),
         "images": plumbing.between(1, plumbing.MOST_IMAGES), "batch": plumbing.between(1, plumbing.MOST_BATCH),
         "micro_batch": plumbing.between(0, plumbing.MOST_BATCH), "lr": plumbing.POSITIVE,
         "warmup": plumbing.between(0, plumbing.MOST_IMAGES), "ema_halflife": plumbing.between(0, plumbing.MOST_IMAGES),
         "ema_rampup": plumbing.at_least(0), "label_dropout": plumbing.FRACTION, "augment": plumbing.PROBABILITY,
         "confident": (is_share, "above 0 and at most 1"),
         "p_mean": plumbing.FINITE, "p_std": plumbing.POSITIVE, "seed": plumbing.SEED,
         "ckpt_every": plumbing.between(0, plumbing.MOST_IMAGES)}


def check(config, world=1, flags=None, resolution=None):
    """Refuse a setting that cannot train, in one line, before any work; with
    `resolution`, also a network that cannot take images of that side."""
    plumbing.check_fields(config, RULES, flags)
    plumbing.check_divisible(config, world, flags)
    plumbing.check_cuda_graphs(config, world, flags)
    share = config.batch // world
    if config.micro_batch and config.micro_batch < share and share % config.micro_batch:
        raise UserError(f"{plumbing.flag('micro_batch', flags)} {config.micro_batch}: must divide each of the "
                        f"{world} processes' {share} images of {plumbing.flag('batch', flags)} {config.batch}")
    if config.size not in SIZES[config.arch]:
        raise UserError(f"{plumbing.flag('size', flags)} {config.size!r}: the {config.arch} comes in "
                        f"{', '.join(SIZES[config.arch])}; choose one, or {plumbing.flag('arch', flags)} uvit")
    shape = SIZES[config.arch][config.size]
    halvings = 0 if config.arch == "uvit" else len(shape["channel_mult"]) - 1
    multiple = shape.get("patch", 1) * 2 ** halvings
    if resolution is not None and resolution % multiple:
        raise UserError(f"{plumbing.flag('size', flags)} {config.size!r}: the {config.size} {config.arch} needs "
                        f"images whose side is a multiple of {multiple}, not {resolution}; choose another size")


def training_labels(config, dataset):
    """The labels stage 2 trains on: the dataset's, or --labels-file's pseudo labels
    (fixmatch.py's pseudo_labels.pt, one per training image) of which each class keeps
    the --confident share stage 1 is surest of (keep_confident); dpt.py's stage 2 too."""
    if not config.labels_file:
        if config.confident < 1:  # true labels have no confidence to choose by
            raise UserError(f"--confident {config.confident}: keeps the pseudo labels stage 1 is surest of, and "
                            "needs them: add --labels-file pseudo_labels.pt, or leave --confident out")
        return dataset.train_y
    path = config.labels_file
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read labels from {path} ({type(error).__name__}); "
                        "expected the pseudo_labels.pt of fixmatch.py") from None
    if not isinstance(saved, dict) or "labels" not in saved:
        raise UserError(f"{path} holds no 'labels'; expected the pseudo_labels.pt of fixmatch.py")
    labels = saved["labels"]
    if not torch.is_tensor(labels) or labels.dtype != torch.int64 or labels.shape != dataset.train_y.shape:
        raise UserError(f"{path}: labels must be int64 of shape ({len(dataset.train_y)},), one per training "
                        f"image of {dataset.name}, not {getattr(labels, 'dtype', type(labels).__name__)} "
                        f"{tuple(getattr(labels, 'shape', ()))}")
    if len(labels) and (labels.min() < 0 or labels.max() >= dataset.num_classes):
        raise UserError(f"{path}: labels must lie in 0..{dataset.num_classes - 1}, "
                        f"found {int(labels.min())}..{int(labels.max())}")
    if config.confident == 1:
        return labels
    confidence = saved.get("confidence")
    if not torch.is_tensor(confidence) or confidence.shape != labels.shape:
        raise UserError(f"--confident {config.confident}: {path} holds no 'confidence' of shape ({len(labels)},), "
                        "one per label as fixmatch.py writes it; give --confident 1")
    return keep_confident(labels, confidence, config.confident, dataset.num_classes)


def keep_confident(labels, confidence, share, null_class):
    """Each class keeps the `share` of its pseudo labels that stage 1 is surest of
    (at least one); the others become the null class. Their images still teach the
    unconditional model that guidance steers from, but no class they may not be:
    with one label a class, stage 1's surest half of a class is right 1.5-14 points more
    often than the whole (RESULTS.md), and each wrong condition becomes wrong samples in stage 3."""
    if share >= 1:
        return labels
    kept = torch.full_like(labels, null_class)
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        surest = confidence[members].topk(max(1, round(share * len(members)))).indices
        kept[members[surest]] = label
    return kept


def crossed(every, before, after):
    """Whether the count went past a multiple of `every` between before and after."""
    return every > 0 and after // every > before // every


def train(config, images, labels, num_classes, progress=True, preview=None, preview_every=0, mirrored=None):
    """EDM training from scratch (or from config.out/ckpt.pt) to config.images.
    images: uint8 pixels [N, C, H, W], moved to the device (CIFAR-10's are 150 MB),
    or float latents already scaled to about unit variance, left where they are
    (ImageNet's, 21 GB with their mirrors, stay on the host, memory-mapped from one
    file whose pages the processes share) while each step's batch moves. A latent
    is flipped by taking `mirrored`'s, the latent of the mirror image: the flip of
    a latent is not one. labels: int64 [N]. Returns the EMA model and a dict of
    metrics; rank 0 writes the checkpoint and calls preview(ema_model, images_seen)
    every preview_every images (dpt.py's grid of samples)."""
    rank, world, device = plumbing.distributed_setup()
    check(config, world, resolution=images.shape[-1])
    on_cuda, pixels = device.type == "cuda", images.dtype == torch.uint8
    flip = config.flip is not False  # unset: as for photos (main sets the dataset's)
    if not pixels and config.augment:
        raise UserError(f"--augment {config.augment}: EDM's augmentation transforms pixels, not latents; "
                        "give --augment 0")
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = make_diffusion(config.arch, config.size, num_classes, images.shape[-1], images.shape[1],
                           None if config.dropout < 0 else config.dropout, data.AUGMENT_DIM if config.augment else 0)
    model.to(device, memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                 fused=True)  # one kernel for all the weights instead of a few per tensor
    torch.manual_seed(config.seed + 1 + rank)  # but every rank draws its own batches and noise
    labels_crc = zlib.crc32(labels.cpu().numpy().tobytes())
    if pixels:
        images, labels = images.to(device), labels.to(device)

    images_seen, metrics = 0, {"history": []}
    checkpoint_path = os.path.join(config.out, "ckpt.pt")
    checkpoint = plumbing.resume(checkpoint_path, config, FREE_TO_CHANGE, world, rank, model, ema_model, optimizer)
    if checkpoint is not None:
        if checkpoint.get("labels_crc") != labels_crc:
            raise UserError(f"checkpoint {checkpoint_path} was trained on other labels; delete it to start "
                            "over, or use another --out")
        images_seen, metrics = checkpoint["images_seen"], checkpoint["metrics"]
        if rank == 0 and progress:
            print(f"resuming {checkpoint_path} at {images_seen:,} of {config.images:,} images", file=sys.stderr)

    compile = plumbing.on_cuda_unless_set(config.compile, device)
    forward, step_loss = plumbing.for_training(model, edm_loss, world, device, compile, config.cuda_graphs)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=plumbing.on_cuda_unless_set(config.bf16, device))

    ckpt_every = config.ckpt_every or min(max(config.images // 20, 1), 2_000_000)
    share = config.batch // world  # images a process puts through the network each step
    micro = min(config.micro_batch or share, share)  # ... in forward passes of this many
    steps_left = -(-(config.images - images_seen) // config.batch)
    timed_from = min(5, steps_left // 2)  # speed is timed after warm-up and compilation
    from tqdm import tqdm
    bar = tqdm(total=config.images, initial=images_seen, desc="diffusion", disable=not progress or rank > 0,
               unit="img", unit_scale=True)
    model.train()
    step, clock, loss_sum, loss_steps, started = 0, plumbing.StepClock(device), torch.zeros((), device=device), 0, \
        time.perf_counter()
    while images_seen < config.images:
        timed = step >= timed_from
        if timed:
            clock.begin()
            if step == timed_from:
                metrics["warmup_seconds"] = clock.started - started  # compilation happens in the first step
        for group in optimizer.param_groups:  # EDM's linear warm-up
            group["lr"] = config.lr * min(images_seen / max(config.warmup, 1e-8), 1)
        pick = torch.randint(len(images), (share,), device=images.device)
        augment_labels = None
        if not pixels:
            # Gathered on the host while the GPU still runs the step before (nothing in a step
            # waits for it), straight into page-locked memory, whose copy runs beside the GPU's work.
            x = torch.empty((share, *images.shape[1:]), dtype=images.dtype, pin_memory=on_cuda)
            torch.index_select(images, 0, pick, out=x)
            if mirrored is not None and flip:  # horizontal flips: the mirror image's latent
                flipped = torch.rand(share) < 0.5
                x[flipped] = mirrored[pick[flipped]]
            x = x.to(device, non_blocking=True).float()
        elif config.augment:
            x, augment_labels = data.edm_augment(images[pick].float() / 127.5 - 1, config.augment, flip=flip)
        else:  # horizontal flips, which a network need not be told of
            x = images[pick].float() / 127.5 - 1
            x = torch.where((torch.rand(share, 1, 1, 1, device=device) < 0.5) & flip, x.flip(3), x)
        x = x.contiguous(memory_format=torch.channels_last)
        noisy, sigma, conditions = edm_noise(x, labels[pick].to(device), num_classes, config)
        plumbing.zero_grad(optimizer)
        for start in range(0, share, micro):  # gradients add up over the micro-batches
            part = slice(start, start + micro)
            if world > 1:  # all-reduce once a step, in the last micro-batch's backward (as nanoGPT)
                forward.require_backward_grad_sync = start + micro == share
            with autocast:
                loss = step_loss(x[part], noisy[part], sigma[part], conditions[part],
                                 None if augment_labels is None else augment_labels[part]) * (micro / share)
            loss.backward()
            loss_sum += loss.detach()
        for param in model.parameters():  # as EDM: one bad batch must not poison the weights
            torch.nan_to_num_(param.grad, nan=0, posinf=1e5, neginf=-1e5)
        optimizer.step()
        # EMA with a half-life in images (EDM), shorter early on so the first weights fade fast.
        halflife = config.ema_halflife
        if config.ema_rampup:
            halflife = min(halflife, images_seen * config.ema_rampup)
        beta = 0.5 ** (config.batch / max(halflife, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - beta)
        images_seen += config.batch
        step += 1
        loss_steps += 1

        done = images_seen >= config.images
        if timed:  # the step alone, not the loss read, preview and checkpoint after it
            clock.end(last=done)
            if done:
                metrics["images_per_second"] = clock.per_second() * config.batch
        if loss_steps == 50 or done:  # reading the loss waits for the GPU: not every step
            metrics["loss"] = (loss_sum / loss_steps).item()
            metrics["history"].append((images_seen, metrics["loss"]))
            loss_sum.zero_()
            loss_steps = 0
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if preview is not None and rank == 0 and crossed(preview_every, images_seen - config.batch, images_seen):
            with torch.random.fork_rng(devices=[device] if on_cuda else []):  # training draws the same numbers
                preview(ema_model, images_seen)
        if crossed(ckpt_every, images_seen - config.batch, images_seen) or done:
            rngs = plumbing.all_rng_states(world)
            if rank == 0:
                plumbing.save_atomic({"model": model.state_dict(), "ema": ema_model.state_dict(),
                                      "optimizer": optimizer.state_dict(), "images_seen": images_seen,
                                      "metrics": metrics, "rng": rngs, "config": asdict(config),
                                      "num_classes": num_classes, "resolution": images.shape[-1],
                                      "channels": images.shape[1], "labels_crc": labels_crc}, checkpoint_path)
        bar.update(config.batch)
    bar.close()
    return ema_model, metrics


# -----------------------------------------------------------------------------
# Command line: stage 2 alone, and the benchmark


def flops_per_image(model):
    """Forward FLOPs of one image (plumbing.forward_flops)."""
    x = torch.zeros(1, model.channels, model.resolution, model.resolution)
    return plumbing.forward_flops(model, x, torch.ones(1), torch.zeros(1, dtype=torch.long))


def training_rate(config, steps=12, images=None):
    """(training images/s, seconds of the warm-up steps, compilation included) of
    config's network at config.batch on `images` (random 32x32 pixels unless given,
    e.g. latents) of 10 classes (in a temporary folder)."""
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8) if images is None else images
    labels = torch.randint(0, 10, (len(images),))
    with tempfile.TemporaryDirectory() as out:
        run = replace(config, out=out, images=config.batch * steps, warmup=config.batch,
                      ckpt_every=config.batch * steps)
        metrics = train(run, images, labels, 10, progress=False)[1]
    return metrics["images_per_second"], metrics["warmup_seconds"]


def benchmark(config, steps=12):
    """Training images/s and model FLOP utilisation of every size of --arch."""
    _, _, device = plumbing.distributed_setup()
    batch, steps = (config.batch, steps) if device.type == "cuda" else (4, 6)  # a CPU is 1000x slower
    name = plumbing.device_name(device)
    for size in PIXEL_SIZES:
        model = make_diffusion(config.arch, size, 10, 32)
        rate, warmup = training_rate(replace(config, size=size, batch=batch), steps)
        # training costs about 3x the forward FLOPs (forward, and a backward of twice)
        mfu = plumbing.peak_share(3 * flops_per_image(model) * rate, device)
        print(f"{config.arch} {size}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{flops_per_image(model) / 1e9:.2f} GFLOP/image forward, batch {batch}: {rate:,.1f} images/s "
              f"after {warmup:.1f} s of warm-up"
              f"{'' if mfu is None else f', MFU {100 * mfu:.1f}%'} ({name}, "
              f"compile={plumbing.on_cuda_unless_set(config.compile, device)}, "
              f"bf16={plumbing.on_cuda_unless_set(config.bf16, device)})")


def main():
    config = plumbing.parse_config(DiffusionConfig, __doc__)
    if config.bench:
        return benchmark(config)
    rank, world, _ = plumbing.distributed_setup()
    check(config, world)
    dataset = data.load_dataset(config.dataset, config.data_dir)
    labels = training_labels(config, dataset)
    plumbing.claim_folder(config.out, rank, world)  # after the input is read: bad input writes nothing
    config = replace(config, flip=dataset.flips if config.flip is None else config.flip)
    model, metrics = train(config, dataset.train_x, labels, dataset.num_classes)
    if rank == 0:
        path = os.path.join(config.out, "diffusion.pt")
        save_diffusion(model, config, metrics, path)
        print(f"saved {path}: final loss {metrics['loss']:.4f}, "
              f"{metrics.get('images_per_second', float('nan')):,.0f} images/s; look at it with "
              f"python sample.py {path} --per-class 8 --out {config.out} (or {config.out}/ckpt.pt while it trains)")


if __name__ == "__main__":
    plumbing.run_main(main)

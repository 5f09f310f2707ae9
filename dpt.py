"""Dual Pseudo Training (You et al., NeurIPS 2023) in one resumable command.

    python dpt.py --labels 1                             # CIFAR-10, 1 label per class, preset for this machine
    python dpt.py --dataset shapes --preset tiny         # the whole pipeline on a laptop CPU in minutes
    torchrun --nproc_per_node 4 dpt.py --labels 4 --preset cifar
    python dpt.py --labels 1 --redo sample --sample-per-class 2000  # sample again, then stage 3 and FID
    python dpt.py --dataset shapes --labels 1 --seeds 0-4 # five runs, then their mean and spread
    python dpt.py --dataset imagenet --preset imagenet --autoencoder autoencoder_kl.pth  # the paper's ImageNet 256

Stage 1 trains FixMatch (or FreeMatch) on a few labels per class and predicts a
pseudo label for every training image; stage 2 trains a class-conditional
diffusion model on all images with those labels and samples K images per class;
stage 3 retrains the classifier from scratch with the samples joining the
labeled set. The imagenet preset reads a folder of images once into Stable
Diffusion latents and MSN features; its stages 1 and 3 fit a linear probe on the
features and its stage 2 trains a U-ViT on the latents (the paper's sec. 5.2).
Files in the run folder are the only link between stages (see README): a
killed run, rerun with the same command, skips what is finished and resumes
what was under way from its checkpoint.
"""

import json
import os
import platform
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

import bench
import data
import fid
import fixmatch
import imagenet
import plumbing
import report
import sample
import unet
from plumbing import UserError

# -----------------------------------------------------------------------------
# Configuration: a preset fills every field the user leaves out


@dataclass
class DPTConfig:
    dataset: str = "cifar10"        # cifar10 | cifar100 | svhn | shapes | glyphs | .pt/.npz | imagenet | a folder
    data_dir: str = "./data"        # where torchvision datasets are downloaded to
    labels: int = 1                 # labeled images per class
    seed: int = None                # seed of the labeled split and of every stage (unset: 0)
    seeds: str = ""                 # A-B or A,B,C: one run per seed instead of --seed, then their mean and spread
    preset: str = ""                # tiny | fast | cifar | imagenet; empty: fast with CUDA, tiny without
    out: str = "runs"               # the run lives in OUT/<dataset>-<labels>l-s<seed>
    redo: str = ""                  # rerun this stage and all after it: encode, stage1, stage2, sample, stage3, fid
    baseline: bool = None           # also train on the labeled images alone, for comparison (unset: tiny's on)
    fid_weights: str = ""           # FID Inception weights (else $DPT_FID_WEIGHTS, the hub cache, or download)
    fid_reference: int = None       # training images FID compares against (0: all)
    bench: bool = False             # print every stage's speed on this device and the presets' projected time, and exit
    report: str = ""                # (re)write RUN/report.html from a finished run folder RUN, and exit
    compile: bool = None            # torch.compile the networks (unset: the preset's, else with CUDA only)
    cuda_graphs: bool = False       # with compile on one GPU: replay each training step as CUDA graphs
    bf16: bool = None               # bf16 autocast (unset: the preset's, else with CUDA only)
    flip: bool = None               # mirror images in augmentation (unset: the dataset's; not digits or glyphs)
    # Each field below is a stage script's flag under its stage's prefix: --ssl-lr is
    # fixmatch.py's --lr, --diffusion-warmup unet.py's --warmup. Unset, it is the
    # preset's, else the stage script's default, which is the paper's recipe.
    # stages 1 and 3: the classifier (fixmatch.py)
    ssl_arch: str = None            # wrn28_2 | small
    ssl_steps: int = None           # stage-1 optimizer steps
    ssl_batch: int = None           # labeled images per step
    ssl_uratio: int = None          # unlabeled images per labeled image
    ssl_lr: float = None            # SGD learning rate
    ssl_lr_cosine: float = None     # the learning rate decays as cos(ssl_lr_cosine pi k / K): 7/16 FixMatch, 1/2 to 0
    ssl_ema: float = None           # EMA of the classifier's weights
    ssl_precise_bn: int = None      # training images the EMA model's BN statistics are measured on (0: copied)
    ssl_threshold: str = None       # fixmatch | freematch
    ssl_tau: float = None           # FixMatch's confidence threshold
    ssl_freematch_start: float = None  # FreeMatch's global threshold at step 0 (0: the paper's 1/C)
    ssl_fairness: float = None      # weight of FreeMatch's self-adaptive fairness loss (0: none)
    ssl_eval_every: int = None      # steps between test evaluations (and checkpoints)
    stage3_steps: int = None        # stage-3 optimizer steps
    stage3_real_fraction: float = None  # share of real images in a stage-3 labeled batch (-1: uniform)
    # stage 2: the diffusion model (unet.py)
    diffusion_arch: str = None      # unet | uvit
    diffusion_size: str = None      # tiny | fast | cifar
    diffusion_images: int = None    # training length in images
    diffusion_batch: int = None     # images per step
    diffusion_micro_batch: int = None  # images per forward pass on a process (0: its whole share of the batch)
    diffusion_lr: float = None      # Adam learning rate
    diffusion_warmup: int = None    # images of learning-rate warm-up
    diffusion_ema_halflife: int = None  # half-life of the EMA of the weights, in images
    diffusion_p_mean: float = None  # training noise levels ln(sigma) ~ N(p_mean, 1.2^2) (EDM: -1.2)
    diffusion_label_dropout: float = None  # share of training labels replaced by the null class (for guidance)
    diffusion_augment: float = None  # EDM's augmentation probability (its CIFAR-10 recipe: 0.12); 0: x-flips only
    diffusion_confident: float = None  # share of each class's pseudo labels kept, the surest; the rest: null class
    diffusion_ckpt_every: int = 0   # images between checkpoints (0: every 5% of the run, at most 2M apart)
    # sampling (sample.py)
    sample_per_class: int = None    # K: generated images per class
    sample_solver: str = None       # heun | euler | dpmpp
    sample_steps: int = None        # solver steps (Heun: 2 N - 1 network evaluations)
    sample_guidance: float = None   # classifier-free guidance weight (1: none)
    # the imagenet preset: frozen networks read every image once, the learner is a linear probe
    image_size: int = 256           # ADM's centre crop of every image; the latents are a side of image_size / 8
    autoencoder: str = ""           # Stable Diffusion's autoencoder_kl.pth (no stable URL: see the README)
    autoencoder_size: str = "sd"    # sd | tiny (the same family, for CPU tests)
    msn_size: str = ""              # vitl7 | vitb4 | tiny; empty: vitl7 for 1 label per class, else vitb4 (DPT's)
    msn_weights: str = ""           # MSN's checkpoint (else downloaded once into torch's cache)
    probe_lambda: float = 0.0025    # the probe's L2 penalty times the number of images it is fit on (MSN's)
    skip_bad_images: bool = False   # leave out the images that cannot be opened (counted in results.json)
    label_subset: str = ""          # the labeled images named in a file (MSN's imagenet_subsets2/1imgs_class.txt)
    fid_stats: str = ""             # FID reference .npz (mu, sigma); empty: ADM's for imagenet, else training images


# Each stage script's settings, written out: the stage script's field on the left,
# the DPTConfig field that sets it on the right (its flag: --ssl-lr sets fixmatch.py's
# --lr). resolve() fills what neither the user nor the preset set from the stage
# script's default; a stage script's refusal names dpt.py's flag (--ssl-steps, where
# fixmatch.py would say --steps).
CLASSIFIER_FLAGS = {  # fixmatch.py: stage 1, the baseline (and the oracle's recipe)
    "dataset": "dataset", "data_dir": "data_dir", "labels": "labels", "seed": "seed", "compile": "compile",
    "cuda_graphs": "cuda_graphs", "bf16": "bf16", "flip": "flip", "arch": "ssl_arch", "steps": "ssl_steps",
    "batch": "ssl_batch", "uratio": "ssl_uratio", "lr": "ssl_lr", "lr_cosine": "ssl_lr_cosine", "ema": "ssl_ema",
    "precise_bn": "ssl_precise_bn", "threshold": "ssl_threshold", "tau": "ssl_tau",
    "freematch_start": "ssl_freematch_start", "fairness": "ssl_fairness", "eval_every": "ssl_eval_every",
    "ckpt_every": "ssl_eval_every"}
STAGE3_FLAGS = {**CLASSIFIER_FLAGS, "steps": "stage3_steps", "real_fraction": "stage3_real_fraction"}  # fixmatch.py
DIFFUSION_FLAGS = {  # unet.py: stage 2
    "dataset": "dataset", "data_dir": "data_dir", "seed": "seed", "compile": "compile", "cuda_graphs": "cuda_graphs",
    "bf16": "bf16", "flip": "flip", "arch": "diffusion_arch", "size": "diffusion_size", "images": "diffusion_images",
    "batch": "diffusion_batch", "micro_batch": "diffusion_micro_batch", "lr": "diffusion_lr",
    "warmup": "diffusion_warmup", "ema_halflife": "diffusion_ema_halflife", "p_mean": "diffusion_p_mean",
    "label_dropout": "diffusion_label_dropout", "augment": "diffusion_augment",
    "confident": "diffusion_confident", "ckpt_every": "diffusion_ckpt_every"}
SAMPLE_FLAGS = {  # sample.py: the samples
    "seed": "seed", "bf16": "bf16", "per_class": "sample_per_class", "solver": "sample_solver",
    "steps": "sample_steps", "guidance": "sample_guidance"}
STAGE_SCRIPTS = ((fixmatch.FixMatchConfig, CLASSIFIER_FLAGS), (fixmatch.FixMatchConfig, STAGE3_FLAGS),
                 (unet.DiffusionConfig, DIFFUSION_FLAGS), (sample.SampleConfig, SAMPLE_FLAGS))

# Presets name only what they change from the stage scripts' defaults, which are
# the paper's recipe (FixMatch on WRN-28-2 for 2^20 steps, EDM's DDPM++ for 200M
# images, Heun with 35 evaluations); DPT's classifier is FreeMatch.
PRESETS = {
    # Two CPU cores, under 10 minutes, any dataset, and DPT must show. The tiny U-Net
    # folds 2x2 pixels into channels (3.5x the images/s) and sees 48,000 images (80,000
    # until the two reference models joined a run, each as long) at
    # noise levels centred on sigma = 1, where the class decides the shape (EDM's
    # -1.2 centres them on 0.3 and drew blobs of no class); guidance 3 makes the
    # class plain in each sample; half of each stage-3 labeled batch stays real (the
    # generated images carry stage 1's confusions; a quarter real lost on glyphs).
    # The classifier ends where its curve has settled: 2,500 steps (at 1,500 stage 1
    # still climbed by up to 3 points on glyphs; 2 unlabeled images per labeled one:
    # as accurate as 3, a third faster), the learning rate decayed to 0, and the EMA
    # model's BN statistics measured on clean images.
    # Stage 1 is FreeMatch, as the paper's DPT: with one label per class FixMatch's fixed
    # threshold confirms its early mistakes on real images (the digits of mnist5k: 38.9%
    # against FreeMatch's 59.1%, labeled images alone 29.6%, three tuning seeds; RESULTS.md,
    # "Stage 1 on real images"). Its global threshold starts at 1, not the paper's 1/C: from 1/C
    # every unlabeled image is learned with the untrained network's guess from the first step, a
    # lottery a run of 2,500 steps never unlearns (RESULTS.md, "A steadier stage 1"). The
    # labeled-only baseline runs too (half a minute): a stage 1 that falls below it is a
    # failed stage 1, whatever stage 3 gains over it.
    # Stage 2 conditions on the surer half of each class's pseudo labels, the rest on
    # the null class: at 40-80% right, each wrong condition draws wrong samples, and the
    # surer half is right 1.5-14 points more often (RESULTS.md, "Stage 2 on the labels
    # stage 1 is sure of"). RESULTS.md, "Results", measures each of these levers. Eager fp32: on 2 CPU cores
    # compile only breaks even (13 s to compile) and neither pays for the U-Net
    # (RESULTS.md, "Speed").
    "tiny": dict(ssl_arch="small", ssl_threshold="freematch", ssl_freematch_start=1.0, ssl_steps=2500, ssl_batch=32,
                 ssl_uratio=2, ssl_lr=0.05, ssl_lr_cosine=0.5,
                 ssl_ema=0.99, ssl_precise_bn=2048, ssl_eval_every=100, stage3_steps=2500, stage3_real_fraction=0.5,
                 diffusion_size="tiny", diffusion_images=48_000, diffusion_batch=32, diffusion_lr=2e-3,
                 diffusion_warmup=1_000, diffusion_ema_halflife=4_000, diffusion_p_mean=0.0,
                 diffusion_label_dropout=0.1, diffusion_augment=0.0, diffusion_confident=0.5,
                 sample_per_class=50, sample_solver="dpmpp", sample_steps=10, sample_guidance=3.0,
                 fid_reference=1000, compile=False, bf16=False, baseline=True),
    # A few hours on one modern GPU: the paper's classifier, shorter; a smaller U-Net.
    "fast": dict(ssl_threshold="freematch", ssl_steps=2 ** 17, stage3_steps=2 ** 17, diffusion_size="fast",
                 diffusion_images=20_000_000, diffusion_warmup=2_000_000, diffusion_augment=0.0),
    # The paper's CIFAR-10 recipe; EDM's batch of 512 in two passes of 256 on one GPU (DDPM++
    # keeps about 120 MiB an image for backward: 60 GiB at once would crowd an 80 GB card).
    "cifar": dict(ssl_threshold="freematch", diffusion_micro_batch=256),
    # The paper's ImageNet 256x256 recipe (its sec. 5.2) as DPT's U-ViT-L/2 configs set it
    # (accelerate_*_large.py; the paper's FIDs of 3.08 / 2.52 are likely its U-ViT-H/2's): on
    # SD latents, batch 1024 for 300k steps, lr 2e-4 after 5k warm-up steps, EMA 0.9999 a
    # step (a half-life of 6,931.1 steps, 7,097,472 images), labels dropped 15% of the time; 50 network
    # evaluations of the sampler at guidance 1.4 (their 0.4), 128 images per class. RESULTS.md, "ImageNet",
    # lists each point beside the official code's. The batch is 4 micro-batches of 256 on one GPU
    # (the large U-ViT recomputes its blocks' activations in backward, as theirs does).
    "imagenet": dict(diffusion_arch="uvit", diffusion_size="large", diffusion_images=300_000 * 1024,
                     diffusion_batch=1024, diffusion_micro_batch=256, diffusion_lr=2e-4, diffusion_warmup=5_000 * 1024,
                     diffusion_ema_halflife=7_097_472, diffusion_label_dropout=0.15, diffusion_augment=0.0,
                     sample_per_class=128, sample_solver="dpmpp", sample_steps=50, sample_guidance=1.4),
}


def reads_folder(config):
    """The imagenet preset reads a folder of images (latents and features), and is the only one that can."""
    return config.preset == "imagenet"


def resolve(config):
    """Fill every field the user left out: from the preset, else from the stage
    script's default; compile and bf16 as the stage scripts do (with CUDA only)
    and FID against every training image."""
    if not config.preset:
        config.preset = "fast" if torch.cuda.is_available() else "tiny"
        if not torch.cuda.is_available() and plumbing.dist_rank() == 0:
            print("no CUDA device: running the tiny preset (give --preset to choose)", file=sys.stderr)
    plumbing.check_fields(config, {"preset": plumbing.one_of(*PRESETS)})
    if config.seeds and config.seed is not None:
        raise UserError(f"--seed {config.seed} --seeds {config.seeds}: give one of them (--seeds runs each "
                        "of its seeds in turn)")
    config.seed = 0 if config.seed is None else config.seed
    folder = config.dataset == "imagenet" or os.path.isdir(config.dataset)
    if folder != reads_folder(config) and not config.bench:  # --bench reads no dataset
        raise UserError(f"--dataset {config.dataset} --preset {config.preset}: "
                        + ("a folder of images needs --preset imagenet" if folder else
                           "--preset imagenet reads a folder in ImageNet's layout (FOLDER/train/CLASS/*.JPEG), "
                           "or --dataset imagenet for DATA_DIR/imagenet"))
    if not config.msn_size and reads_folder(config):
        config.msn_size = "vitl7" if config.labels == 1 else "vitb4"
    if os.path.isfile(config.dataset):  # one spelling of a file, so that a stage's checkpoint knows it again
        config.dataset = os.path.realpath(config.dataset)
    if config.flip is None:
        config.flip = data.dataset_flips(config.dataset)
    defaults = dict(compile=torch.cuda.is_available(), bf16=torch.cuda.is_available(), fid_reference=0,
                    baseline=False)
    defaults.update({ours: getattr(script_config, name) for script_config, flags in STAGE_SCRIPTS  # a stage's own
                     for name, ours in flags.items() if ours != name})  # settings, named under its prefix
    for name, value in {**defaults, **PRESETS[config.preset]}.items():
        if getattr(config, name) is None:
            setattr(config, name, value)


# The run folder's rules, one row a stage in the order the stages run: what the
# stage makes there, which a --redo of it or of an earlier stage removes. A stage is
# done when its last file exists (stage_* below name it). The imagenet preset's
# encoding comes first, so that --redo stage1 (a new labeled split) keeps it; the
# baseline's files go with stage 1, whose split it trains on, and the references'
# with stage 2, whose recipe they train with, and with the samples.
MADE_BY = {
    "encode": ("encoded", "encoded.pt"),  # the chunks under way, then every latent and feature
    "split": ("split.pt",),
    "stage1": ("stage1", "baseline", "pseudo_labels.pt"),
    "stage2": ("stage2", "few_labels"),
    "sample": ("samples.pt", "samples.png", "few_labels/samples.pt", "few_labels/samples.png", "every_label"),
    "stage3": ("stage3",),
    # the imagenet preset's oracle probe is fit again after any redo
    "fid": ("fid.json", "few_labels/fid.json", "every_label/fid.json", "oracle.pt"),
}
# The wall times (timings.json) that go with a stage's files beside the stage's own.
TIMED_WITH = {"stage1": ("baseline",), "stage2": ("few_labels",), "sample": ("reference_samples",)}
STAGES = tuple(MADE_BY)
REDO_STAGES = tuple(stage for stage in STAGES if stage != "split")  # --redo stage1 draws the split again

# The stage each setting belongs to: a setting changed in a run folder is refused
# unless --redo reruns that stage or an earlier one. The dataset is compared by its
# contents (split.pt keeps them), not by how its name is spelled: ./glyphs.npz is
# glyphs.npz, a regenerated glyphs.npz is not. FREE_TO_CHANGE's settings change
# nothing a stage made.
FIELD_STAGE = {
    **dict.fromkeys(("image_size", "autoencoder", "autoencoder_size", "skip_bad_images", "msn_size", "msn_weights"),
                    "encode"),
    **dict.fromkeys(("labels", "seed", "label_subset"), "split"),
    **dict.fromkeys(("bf16", "flip", "probe_lambda", "ssl_arch", "ssl_steps", "ssl_batch", "ssl_uratio", "ssl_lr",
                     "ssl_lr_cosine", "ssl_ema", "ssl_precise_bn", "ssl_threshold", "ssl_tau",
                     "ssl_freematch_start", "ssl_fairness"), "stage1"),
    **dict.fromkeys(("diffusion_arch", "diffusion_size", "diffusion_images", "diffusion_batch", "diffusion_lr",
                     "diffusion_warmup", "diffusion_ema_halflife", "diffusion_p_mean", "diffusion_label_dropout",
                     "diffusion_augment", "diffusion_confident"), "stage2"),
    **dict.fromkeys(("sample_per_class", "sample_solver", "sample_steps", "sample_guidance"), "sample"),
    **dict.fromkeys(("stage3_steps", "stage3_real_fraction"), "stage3"),
    "fid_reference": "fid",
}
# Settings added after run folders were made with dpt.py, each with the value that
# does what the versions before it did: a folder without one was made with that value.
ADDED_SINCE = {"diffusion_confident": 1.0, "ssl_freematch_start": 0.0, "ssl_fairness": 0.0, "flip": True}
# The files a stage reads are settings by what they hold (plumbing.file_identity), not by
# their path, so that a file replaced under its name is refused as another setting
# would be; folders made before they were recorded take them as they are. The FID
# stage's weights and reference statistics are recorded in each fid.json instead: they
# may be found without a flag ($DPT_FID_WEIGHTS, torch's cache), or only later.
FILE_SETTINGS = ("label_subset", "autoencoder", "msn_weights")
FREE_TO_CHANGE = {"dataset", "data_dir", "out", "redo", "baseline", "fid_weights", "fid_stats", "compile",
                  "cuda_graphs", "preset", "ssl_eval_every", "diffusion_micro_batch", "diffusion_ckpt_every",
                  "bench", "report", "seeds"}


def resolved(config):
    """config, every field filled (resolve)."""
    resolve(config)
    return config


def classifier_settings(config, stage, out=""):
    """fixmatch.py's settings for stage 1, stage 3 or the baseline, and the flags
    they come from. One recipe for all three: the baseline drops the unlabeled
    loss (lambda_u = 0), which is what makes it train on the labeled images alone."""
    flags = STAGE3_FLAGS if stage == "stage3" else CLASSIFIER_FLAGS
    settings = {name: getattr(config, ours) for name, ours in flags.items()}
    return fixmatch.FixMatchConfig(**settings, out=out, lambda_u=0.0 if stage == "baseline" else 1.0), flags


def diffusion_settings(config, out="", labels_file=""):
    """unet.py's settings for stage 2, and the flags they come from; unless
    --diffusion-ckpt-every says otherwise, a checkpoint every 5% of the run (at most
    2M images apart)."""
    settings = {name: getattr(config, ours) for name, ours in DIFFUSION_FLAGS.items()}
    settings["ckpt_every"] = settings["ckpt_every"] or min(max(config.diffusion_images // 20, 1), 2_000_000)
    return unet.DiffusionConfig(**settings, out=out, labels_file=labels_file), DIFFUSION_FLAGS


def sample_settings(config, out=""):
    """sample.py's settings for the samples, and the flags they come from."""
    settings = {name: getattr(config, ours) for name, ours in SAMPLE_FLAGS.items()}
    return sample.SampleConfig(**settings, checkpoint="", out=out), SAMPLE_FLAGS


MOST_SEEDS = 1000  # runs in one sweep: a typo such as 0-10000000000 is refused, not begun
RULES = {"dataset": data.KNOWN_DATASET, "data_dir": data.NOT_A_FILE,
         "labels": plumbing.between(1, plumbing.MOST_IMAGES),
         "seed": plumbing.SEED, "out": data.NOT_A_FILE,
         "redo": ((lambda stage: stage in ("", *REDO_STAGES)), "one of " + ", ".join(REDO_STAGES)),
         "fid_weights": ((lambda path: not path or os.path.isfile(path)), "an existing file, or empty"),
         "fid_reference": plumbing.between(0, plumbing.MOST_IMAGES),
         "seeds": ((lambda text: not text or parse_seeds(text) is not None),
                   f"A-B or A,B,C: at most {MOST_SEEDS:,} distinct seeds, each {plumbing.SEED[1]}"),
         "image_size": ((lambda side: side > 0 and side % 16 == 0), "a positive multiple of 16 (latents of side / 8)"),
         "autoencoder": ((lambda path: not path or os.path.isfile(path)), "an existing file, or empty"),
         "autoencoder_size": plumbing.one_of(*imagenet.AUTOENCODER_SIZES),
         "msn_size": ((lambda size: size in ("", *imagenet.MSN_SIZES)), "one of " + ", ".join(imagenet.MSN_SIZES)),
         "msn_weights": ((lambda path: not path or os.path.isfile(path)), "an existing file, or empty"),
         "probe_lambda": plumbing.POSITIVE,
         "label_subset": ((lambda path: not path or os.path.isfile(path)), "an existing file, or empty"),
         "fid_stats": ((lambda path: not path or os.path.isfile(path)), "an existing .npz file, or empty")}


def check(config, world, dataset=None):
    """Refuse a bad setting of any stage in one line naming its flag, before the
    dataset loads (and again with the dataset, before any stage runs): the rules
    are dpt.py's own and the stage scripts', which check their own flags the same way."""
    plumbing.check_fields(config, RULES)
    latent = reads_folder(config)
    if latent:
        imagenet.check_latent(config)
    else:
        given = [f"--{name.replace('_', '-')}" for name in imagenet.LATENT_FIELDS
                 if getattr(config, name) != getattr(DPTConfig(), name)] + ["--redo encode"] * (config.redo == "encode")
        if given:
            raise UserError(f"{given[0]} is for --preset imagenet, which reads a folder of images; leave it out")
    for stage in ("stage1", "stage3"):
        settings, flags = classifier_settings(config, stage)
        fixmatch.check(settings, world, flags)
    settings, flags = diffusion_settings(config)
    side = config.image_size // 8 if latent else None if dataset is None else dataset.train_x.shape[-1]
    unet.check(settings, world, flags, resolution=side)
    sample.check(*sample_settings(config))
    for flag, path, read in (("--fid-weights", config.fid_weights, fid.check_weights),
                             ("--fid-stats", config.fid_stats, fid.read_stats)):
        try:  # the files the last stage reads, read before the first: not a surprise after hours
            if path:
                read(path)
        except fid.FIDError as error:
            raise UserError(f"{flag} {error}") from None  # "--fid-weights PATH is not ..."
    if config.sample_guidance != 1 and not config.diffusion_label_dropout:  # the null class never learned
        raise UserError(f"--sample-guidance {config.sample_guidance}: guidance needs a diffusion model trained "
                        "with --diffusion-label-dropout above 0; give --sample-guidance 1, or "
                        "--diffusion-label-dropout 0.1 (with --redo stage2 in an existing run folder)")
    if dataset is not None:
        labeled_split(config, dataset)  # an impossible --labels, or a subset file that does not fit
        # FID's covariances need 2 images on every process, of the reference and of the samples.
        reference = min(config.fid_reference or len(dataset.train_y), len(dataset.train_y))
        generated = config.sample_per_class * dataset.num_classes
        pixels = config.image_size if latent else dataset.train_x.shape[-1]  # the samples' side, decoded
        held = generated * 3 * pixels ** 2  # uint8 pixels, which every process holds at once
        if held > plumbing.memory_bytes():
            raise UserError(f"--sample-per-class {config.sample_per_class}: {generated:,} images of {pixels}x"
                            f"{pixels} ({held / 2 ** 30:,.0f} GiB) do not fit in this machine's "
                            f"{plumbing.memory_bytes() / 2 ** 30:,.0f} GiB; give fewer")
        if (reference < 2 * world and not config.fid_stats) or generated < 2 * world:
            raise UserError(f"--fid-reference {config.fid_reference} and --sample-per-class "
                            f"{config.sample_per_class} give a process fewer than 2 images to compute FID "
                            f"with; give at least {2 * world} reference and generated images")


def run_folder(config):
    name = os.path.splitext(os.path.basename(os.path.normpath(config.dataset)))[0]
    return os.path.join(config.out, f"{name}-{config.labels}l-s{config.seed}")


def contents_crc(dataset):
    """The dataset named by what it holds (every label, every 97th image; of a
    folder, every file's name and every 97th file's size), so that two spellings
    of one file are one dataset and a regenerated file another."""
    if dataset.train_x is None:
        files = dataset.train_files
        names = "\n".join(os.path.relpath(file, os.path.dirname(os.path.dirname(file))) for file in files)
        sizes = [os.path.getsize(file) for file in files[::97]]
        return zlib.crc32(dataset.train_y.numpy().tobytes() + names.encode() + np.array(sizes).tobytes())
    return zlib.crc32(dataset.train_y.numpy().tobytes() + dataset.train_x[::97].numpy().tobytes())


# -----------------------------------------------------------------------------
# The run folder: refusing one made with other settings, removing what a --redo
# reruns (every stage's pattern, the missing work done once, then loaded: plumbing.once)


def first_to_rerun(config, run, settings, saved):
    """The index in STAGES of the first stage this run reruns (len(STAGES): none),
    from --redo; refuses a folder made by settings no one knows, or by settings
    that differ in a stage before it."""
    if saved is None and set(os.listdir(run)) - {"run.lock", "timings.json"}:  # made by settings no one knows
        raise UserError(f"{run} holds a run's files but no config.json, so the settings they were made with "
                        "are unknown; delete the folder to start over, or choose another --out")
    if saved is not None and set(saved) != set(settings):  # made before a flag was renamed
        raise UserError(f"{run} was made by another version of dpt.py (its settings are named "
                        f"{', '.join(sorted(set(saved) ^ set(settings)))}); start over with another "
                        "--out, or delete the folder")
    redo = "split" if config.redo == "stage1" else config.redo  # stage 1 draws its labeled split again too
    first = STAGES.index(redo) if redo else len(STAGES)
    changed = sorted(k for k, v in settings.items() if saved is not None and saved.get(k) != v)
    earliest = min((STAGES.index(FIELD_STAGE[k]) for k in changed), default=len(STAGES))
    if earliest < first:
        stage = "stage1" if STAGES[earliest] == "split" else STAGES[earliest]
        raise UserError(f"{run} was made with other settings ({', '.join(changed)}); add "
                        f"--redo {stage} to rerun from the stage they change, or choose another --out")
    return first


def remove_stages(run, stages):
    """What `stages` made (MADE_BY), their wall times and results.json."""
    for name in [name for stage in stages for name in MADE_BY[stage]] + ["results.json"]:
        target = os.path.join(run, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    untimed = set(stages) | {name for stage in stages for name in TIMED_WITH.get(stage, ())}
    timings = plumbing.read_json(os.path.join(run, "timings.json")) or {}
    plumbing.write_json({k: v for k, v in timings.items() if k not in untimed}, os.path.join(run, "timings.json"))


def run_settings(config):
    """What config.json records: the settings that change what a stage makes,
    each input file by what it holds."""
    settings = {k: v for k, v in asdict(config).items() if k not in FREE_TO_CHANGE}
    return {**settings, **{name: plumbing.file_identity(getattr(config, name)) for name in FILE_SETTINGS}}


def check_run_folder(config, run, dataset):
    """Decide, then change files. Refuse settings or input files that differ
    from the ones this run folder was made with, unless --redo reruns the first
    stage they affect, and any file the run keeps that it could not go on from
    (check_kept); only then remove that stage's files and those of every later
    stage, once: until the run finishes, redo.json remembers the redo, so that the
    same command after a kill resumes it instead of throwing its progress away
    again. A refused command leaves the folder as it was."""
    path = os.path.join(run, "config.json")
    settings = run_settings(config)
    saved = plumbing.read_json(path, advice="the settings its files were made with are unknown; delete the folder "
                               f"{run} to start over, or choose another --out")
    if saved is not None:  # settings added since the folder was made, and those no longer recorded there
        saved = {**{k: v for k, v in ADDED_SINCE.items() if k in settings},
                 **{k: settings[k] for k in FILE_SETTINGS}, **saved}
        saved = {k: v for k, v in saved.items() if k not in FREE_TO_CHANGE}
    first = first_to_rerun(config, run, settings, saved)
    pending = plumbing.read_json(os.path.join(run, "redo.json"),  # a --redo begun and not finished
                                 advice="remove it and run the same command again (a --redo begins again)")
    resumed = config.redo and saved == settings and pending == {"redo": config.redo}
    removed = STAGES[first:] if saved is not None and not resumed else ()
    check_kept(config, run, dataset, STAGES[:first], removed)
    if resumed and plumbing.dist_rank() == 0:
        print(f"resuming the --redo {config.redo} begun earlier in {run} (its progress kept)", file=sys.stderr)
    plumbing.barrier()  # every rank has checked before rank 0 changes anything
    if plumbing.dist_rank() == 0:
        if removed or saved is None:
            remove_stages(run, removed)
        plumbing.write_json(settings, path)
        if removed:
            plumbing.write_json({"redo": config.redo}, os.path.join(run, "redo.json"))
    plumbing.barrier()


def check_kept(config, run, dataset, kept, removed):
    """Refuse, in one line and before anything is removed, what would stop the run
    later: a file of the `kept` stages made from other data than the dataset holds
    now (the split's contents, the encoded folder's files), made with other FID
    inputs, or damaged; and in the imagenet preset, networks that cannot be loaded
    where a stage will load them (encoding, sampling)."""
    def path(name):
        return os.path.join(run, name)
    if "encode" in kept and os.path.exists(path("encoded.pt")):
        encoded = plumbing.read_artifact(path("encoded.pt"), "encode", mmap=True)
        records = {"train": dataset.train_files, "test": dataset.test_files}
        changes = "; ".join(f"{split}: {changed}" for split, files in records.items() if (
            changed := data.folder_changes((encoded[split] or {}).get("files", []),
                                           data.file_records(files, dataset.root))))
        if changes:  # never latents or features of other files than the folder's
            raise UserError(f"{dataset.root} changed since {run} encoded it ({changes}); add --redo encode "
                            "to encode it again, or put the files back")
    if "split" in kept and os.path.exists(path("split.pt")):
        split = plumbing.read_artifact(path("split.pt"), "stage1", mmap=True)
        if split.get("contents") != contents_crc(dataset) or split.get("size") != len(dataset.train_y):
            raise UserError(f"{run} was made from other data than {config.dataset} holds now (a regenerated "
                            "or another file of that name); add --redo stage1 to start over on it, or choose "
                            "another --out")
    if "fid" in kept:
        check_fid_inputs(config, [path(FID_FILES[name]) for name in FID_FILES])
    checked = {path("split.pt"), path("encoded.pt")}  # read above
    for name in [name for stage in kept for name in MADE_BY[stage]] + ["results.json"]:
        for file in plumbing.files_under(path(name)):
            if file in checked:
                continue
            if file.endswith(".pt"):
                plumbing.read_artifact(file, mmap=True)
            elif file.endswith(".json"):
                plumbing.read_json(file)
    plumbing.read_json(path("timings.json"), advice="remove it and run the same command again (the wall times of "
                                                "the stages done are lost)")
    made_again = lambda name: not os.path.exists(path(name)) or any(
        name == made or name.startswith(made + "/") for stage in removed for made in MADE_BY[stage])
    decoded = ["samples.pt"] + ["few_labels/samples.pt", "every_label/samples.pt"] * bool(config.baseline)
    if reads_folder(config) and any(made_again(name) for name in ["encoded.pt", *decoded]):
        imagenet.msn_for(config, "cpu"), imagenet.load_autoencoder(config.autoencoder, config.autoencoder_size)


# -----------------------------------------------------------------------------
# The stages. Each reads its inputs from the run folder and leaves its outputs
# there; a stage whose last file exists is skipped, one with a ckpt.pt resumes.


def labeled_split(config, dataset):
    """The labeled images' indices: --labels per class drawn by --seed, or the
    files --label-subset names, one a line (MSN's and DPT's ImageNet subsets)."""
    if not config.label_subset:
        return data.labeled_split(dataset.train_y, config.labels, config.seed)
    return imagenet.msn_subset(config.label_subset, dataset.train_files, dataset.train_y, config.labels,
                               os.path.join(dataset.root, "train"))


def stage_split(config, run, dataset):
    """The labeled images, drawn once and kept with the contents they were drawn
    from, which check_kept compares with the dataset's: a run folder never goes on
    with another dataset than the one it began."""
    path = os.path.join(run, "split.pt")
    make = lambda: plumbing.save_atomic({"indices": labeled_split(config, dataset), "seed": config.seed,
                                         "dataset": dataset.name, "size": len(dataset.train_y),
                                         "contents": contents_crc(dataset)}, path)  # read only to draw a split
    split = plumbing.once(path, make, lambda path: plumbing.read_artifact(path, "stage1"), every_rank=False,
                 timed=(run, "split"))
    return split["indices"]  # one kept from an earlier command: of this data (check_kept)


def stage_pseudo_labels(run, learner, model, dataset):
    """Stage 1's last step: its learner's label and confidence for every training image."""
    path = os.path.join(run, "pseudo_labels.pt")
    make = lambda: plumbing.save_atomic(fixmatch.pseudo_labels(learner.predict_training(model), dataset.train_y), path)
    return plumbing.once(path, make, lambda path: plumbing.read_artifact(path, "stage1"), every_rank=False,
                timed=(run, "stage1"))


def stage_2(config, run, images, pseudo_labels, num_classes, mirrored=None):
    """The class-conditional diffusion model, trained on every training image
    (pixels, or the imagenet preset's latents and their mirrors') with its pseudo
    label, or with the null class where stage 1 was among the least sure of a class."""
    out = os.path.join(run, "stage2")

    def make():
        labels = unet.keep_confident(pseudo_labels["labels"], pseudo_labels["confidence"], config.diffusion_confident,
                                     num_classes)
        train_diffusion(config, out, images, labels, num_classes, mirrored,
                        labels_file=os.path.join(run, "pseudo_labels.pt"))
    plumbing.once(os.path.join(out, "diffusion.pt"), make, timed=(run, "stage2"))


def train_diffusion(config, out, images, labels, num_classes, mirrored=None, labels_file="", seed=None):
    """Stage 2's recipe on these labels (the null class: num_classes) into
    out/diffusion.pt, resumed from out/ckpt.pt; a preview grid halfway and at the end."""
    settings, _ = diffusion_settings(config, out=out, labels_file=labels_file)
    settings = settings if seed is None else replace(settings, seed=seed)
    pixels = images.dtype == torch.uint8  # latents would need decoding first: no preview
    preview = lambda model, images_seen: sample.preview_grid(model, os.path.join(out, "grid.png"), per_class=4, steps=8)
    model, metrics = unet.train(settings, images, labels, num_classes, preview=preview if pixels else None,
                                preview_every=max(config.diffusion_images // 2, 1), mirrored=mirrored)
    if plumbing.dist_rank() == 0:
        unet.save_diffusion(model, settings, metrics, os.path.join(out, "diffusion.pt"))


def stage_sample(config, run, device, rank, world):
    """Stage 2's samples: run/samples.pt."""
    return sample_into(config, os.path.join(run, "stage2", "diffusion.pt"), run, device, rank, world,
                       timed=(run, "sample"))


def sample_into(config, checkpoint, folder, device, rank, world, timed=None):
    """K images per class from the EMA weights of the diffusion model at
    `checkpoint` into folder/samples.pt (and samples.png), split across ranks,
    image i from the noise of (seed, i) whichever model draws it; the imagenet
    preset's are decoded from latents, and their MSN features (what its probe
    sees) are kept beside them."""
    path = os.path.join(folder, "samples.pt")

    def make():
        model = unet.load_diffusion(checkpoint, device)
        settings, _ = sample_settings(config, out=folder)
        decode = None
        if reads_folder(config):
            autoencoder = imagenet.load_autoencoder(config.autoencoder, config.autoencoder_size, device)
            decode = lambda latents: imagenet.decode_latents(autoencoder, latents)
        # Decoded images (the imagenet preset's: 25 GB) are gathered to process 0 alone, with their features.
        images, labels = sample.generate(model, settings.per_class, solver=settings.solver, steps=settings.steps,
                                         guidance=settings.guidance, seed=settings.seed, device=device, rank=rank,
                                         world=world, bf16=settings.bf16, decode=decode, gather=decode is None)
        artifact = {"images": images, "labels": labels}
        if decode is not None:  # each process sees its share, as it sampled them
            artifact["features"] = imagenet.msn_features(imagenet.msn_for(config, device), images, config.bf16)
            if world > 1:
                artifact = {name: plumbing.gather_to_first(share, len(labels), world, device)
                            for name, share in artifact.items() if name != "labels"}
                artifact["labels"] = labels
            images = artifact["images"]
        if rank == 0:
            plumbing.save_atomic(artifact, path)
            sample.save_grid(images, labels, os.path.join(folder, "samples.png"))
    return plumbing.once(path, make, lambda path: plumbing.read_artifact(path, "sample", mmap=True), timed=timed)


def fid_inputs(config):
    """The files FID reads, by what they hold: the Inception weights (None while
    there are none: FID is skipped) and the reference statistics (None: the
    training images', or the imagenet preset's ADM statistics)."""
    weights = fid.weights_file(config.fid_weights or None)
    return {"fid_weights": weights and plumbing.file_identity(weights),
            "fid_stats": plumbing.file_identity(config.fid_stats) or None}


def check_fid_inputs(config, paths):
    """Refuse fid.json files computed with other FID weights or statistics than
    these; a run that has none (offline) keeps them, as it could not remake them."""
    current = fid_inputs(config)
    for path in filter(os.path.exists, paths):
        recorded = plumbing.read_json(path)
        changed = [key for key, identity in current.items() if identity and recorded.get(key, identity) != identity]
        if changed:
            raise UserError(f"{path} was computed with other --{changed[0].replace('_', '-')} "
                            f"({recorded.get(changed[0]) or 'none'}) than now ({current[changed[0]]}); add "
                            "--redo fid to compute it again, or give the file it was computed with")


def split_statistics(model, images, keep_logits, rank, world, read=None):
    """Inception statistics of `images` (uint8, or files that read(file) turns
    into uint8 images), each rank taking every world-th image."""
    mine = images[rank::world]
    batches = (mine.split(200) if read is None else
               (torch.stack([read(file) for file in mine[start:start + 200]]) for start in range(0, len(mine), 200)))
    part = fid.statistics(model, batches, keep_logits=keep_logits)
    if world == 1:
        return part
    parts = [None] * world
    dist.all_gather_object(parts, part)
    merged = fid.merge_statistics(parts)
    if keep_logits:  # back in image order: the Inception Score must not depend on the number of processes
        merged["logits"] = torch.empty_like(merged["logits"])
        for rank_part, part in enumerate(parts):
            merged["logits"][rank_part::world] = part["logits"]
    return merged


FID_FILES = {"dpt": "fid.json", "few_labels": "few_labels/fid.json", "every_label": "every_label/fid.json"}


def stage_fid(config, run, dataset, sample_sets, device, rank, world):
    """{name: FID and IS} of each set of samples (sample_sets: {name: (samples,
    the json file to write)}) against the training images (or --fid-stats; ADM's
    for imagenet, whose FID takes 50 samples a class, 50,000 in all, where the
    official code draws 50,000 with uniform random labels); the reference
    statistics are computed once for all of them. None, with a notice, when the
    Inception weights or the reference statistics cannot be had."""
    missing = {name: pair for name, pair in sample_sets.items() if not os.path.exists(pair[1])}

    def make():
        try:
            model = fid.load_inception(config.fid_weights or None, device)
            stats = config.fid_stats or config.dataset == "imagenet" and fid.download_stats(fid.ADM_IMAGENET256)
            real = fid.read_stats(stats) if stats else None
        except fid.FIDError as error:
            if rank == 0:
                print(f"FID skipped: {error}", file=sys.stderr)
            return
        if real is None and dataset.train_x is None:  # a folder: a fixed random subset of its files
            order = torch.randperm(len(dataset.train_files), generator=torch.Generator().manual_seed(0))
            files = [dataset.train_files[i] for i in order[:config.fid_reference or None]]
            real = split_statistics(model, files, False, rank, world, read=lambda file: imagenet.read_image(config, file))
        elif real is None:
            real = split_statistics(model, dataset.train_x[:config.fid_reference or None], False, rank, world)
        for name, (samples, path) in missing.items():
            generated = samples["images"]
            if reads_folder(config):
                generated = generated.unflatten(0, (dataset.num_classes, -1))[:, :50].flatten(0, 1)
            generated = split_statistics(model, generated, True, rank, world)
            if rank == 0:
                try:  # e.g. samples whose statistics hold NaN: the run still ends with its results
                    score = fid.frechet_distance(generated["mu"], generated["sigma"], real["mu"], real["sigma"])
                except fid.FIDError as error:
                    print(f"FID of the {name} samples skipped: {error}", file=sys.stderr)
                    continue
                plumbing.write_json({"fid": score, "inception_score": fid.inception_score(generated["logits"])[0],
                                     "generated_images": generated["count"], "reference_images": real.get("count"),
                                     **fid_inputs(config)}, path)
    if missing:
        start = time.perf_counter()
        make()
        plumbing.add_time(run, "fid", time.perf_counter() - start)
    plumbing.barrier()
    return {name: plumbing.read_json(path) for name, (_, path) in sample_sets.items()}  # None where it was skipped


# -----------------------------------------------------------------------------
# The oracle: a judge that knows the truth. The stage-1 judge says what DPT
# believes: where stage 1 confuses two classes, the diffusion model learns the
# confusion and stage 1 approves it. The oracle is the stage-1 classifier's recipe
# trained on every true label, once per dataset (seed 0), cached in OUT/oracle/
# and reused by every run on that dataset; DPT never uses it.

ORACLE_SEED = 0


def oracle_settings(config, dataset):
    """Stage 1's settings with every training image labeled and no unlabeled loss;
    a step puts as many labeled images through the network as a stage-1 step puts
    images. The folder names the dataset by its contents and the recipe by a
    checksum of the settings it trains with, so a regenerated file or another
    recipe (a run with other --ssl-steps) gets its own oracle instead of
    another's, and settings of the unlabeled loss (--ssl-threshold) share one."""
    settings, _ = classifier_settings(config, "stage1")
    settings = replace(settings, seed=ORACLE_SEED, lambda_u=0.0, batch=settings.batch * (1 + 2 * settings.uratio),
                       real_fraction=-1.0, labels=int(torch.bincount(dataset.train_y).max()))
    ignored = fixmatch.FREE_TO_CHANGE | fixmatch.UNLABELED_ONLY | {"dataset"}
    recipe = {k: v for k, v in asdict(settings).items() if k not in ignored}
    name = f"{dataset.name}-{config.ssl_arch}-{contents_crc(dataset):08x}-{zlib.crc32(json.dumps(recipe).encode()):08x}"
    return replace(settings, out=os.path.join(config.out, "oracle", name))


def stage_oracle(config, dataset, device, rank, world):
    """The oracle, its metrics and its file: trained on first use (a run that
    finds another training it waits), loaded afterwards."""
    settings = oracle_settings(config, dataset)
    path = os.path.join(settings.out, "classifier.pt")
    if not os.path.exists(path):
        with plumbing.folder_claimed(settings.out, rank, world, wait=True):
            if not os.path.exists(path):  # not finished by the run we waited for
                if rank == 0:
                    print(f"training the oracle once for {dataset.name}: {settings.out}", file=sys.stderr)
                model, metrics = fixmatch.train(settings, dataset, torch.arange(len(dataset.train_y)))
                if rank == 0:
                    fixmatch.save_classifier(model, settings, metrics, path)
            plumbing.barrier()
    return (*fixmatch.load_classifier(path, device), path)


# -----------------------------------------------------------------------------
# The generator's half of DPT's claim (the "mutually" of the paper's title): is a
# diffusion model trained on stage 1's pseudo labels better than one that has only
# the few labels, and how far is it from one that has them all? Two references, stage 2's
# recipe on other labels, sampled as stage 2 is from the same noise, so that only
# the labels differ. Few labels: the labeled images keep their label and every
# other image trains as the null class, what one would train without DPT (per run:
# it depends on the split). Every label: every training image's true label, the
# supervised ceiling, trained once per dataset and recipe (seed 0) in
# OUT/every_label/ and reused by every run and seed, as the oracle is.

EVERY_LABEL_SEED = 0


def few_label_conditions(true_labels, labeled_index, num_classes):
    """The labeled images' true labels; every other image the null class (num_classes)."""
    conditions = torch.full_like(true_labels, num_classes)
    conditions[labeled_index] = true_labels[labeled_index]
    return conditions


def every_label_folder(config, dataset):
    """OUT/every_label/<dataset>-<its contents>-<the recipe>: a regenerated file or
    another stage-2 recipe gets its own model; the settings that change nothing it
    trains (which of stage 1's labels stage 2 keeps, the run's seed) share one."""
    settings, _ = diffusion_settings(config)
    ignored = unet.FREE_TO_CHANGE | {"dataset", "confident", "seed"}
    recipe = {k: v for k, v in asdict(settings).items() if k not in ignored}
    name = f"{dataset.name}-{contents_crc(dataset):08x}-{zlib.crc32(json.dumps(recipe).encode()):08x}"
    return os.path.join(config.out, "every_label", name)


def stage_references(config, run, dataset, labeled_index, images, device, rank, world, mirrored=None):
    """{"few_labels": samples, "every_label": samples}: each reference trained
    (or loaded) and sampled into the run folder."""
    few = os.path.join(run, "few_labels")
    train_few = lambda: train_diffusion(config, few, images, few_label_conditions(
        dataset.train_y, labeled_index, dataset.num_classes), dataset.num_classes, mirrored)
    plumbing.once(os.path.join(few, "diffusion.pt"), train_few, timed=(run, "few_labels"))
    every = every_label_folder(config, dataset)
    if not os.path.exists(os.path.join(every, "diffusion.pt")):
        with plumbing.folder_claimed(every, rank, world, wait=True):
            if not os.path.exists(os.path.join(every, "diffusion.pt")):  # not finished by the run we waited for
                if rank == 0:
                    print(f"training the every-label diffusion model once for {dataset.name}: {every}",
                          file=sys.stderr)
                train_diffusion(config, every, images, dataset.train_y, dataset.num_classes, mirrored,
                                seed=EVERY_LABEL_SEED)
            plumbing.barrier()
    timed = (run, "reference_samples")
    return {"few_labels": sample_into(config, os.path.join(few, "diffusion.pt"), few, device, rank, world, timed),
            "every_label": sample_into(config, os.path.join(every, "diffusion.pt"), os.path.join(run, "every_label"),
                                       device, rank, world, timed)}


def judge_generation(learner, oracle, sample_sets, num_classes):
    """Each set of samples as the oracle sees it: the share it puts in the
    intended class (overall and per class), and, against the test images, the
    Fréchet distance and precision/recall (k = 3) of the oracle's penultimate
    features (None without a test set). The share alone would flatter a model
    that draws copies of its one image of a class; the distance and recall do not."""
    test = learner.embed_test(oracle)
    judged = {}
    for name, samples in sample_sets.items():
        share = report.sample_accuracy(learner.predict_samples(oracle, samples), samples["labels"], num_classes)
        features = dict.fromkeys(("feature_fd", "precision", "recall"))
        try:
            if test is not None:
                features = fid.feature_metrics(test, learner.embed_samples(oracle, samples))
        except fid.FIDError as error:  # too few images, or features that are not finite: the run still ends
            print(f"the oracle's Fréchet distance and precision/recall of the {name} samples skipped: {error}",
                  file=sys.stderr)
        judged[name] = {"oracle_share": share["accuracy"], "oracle_share_per_class": share["per_class"], **features}
    return judged


# -----------------------------------------------------------------------------
# The learner of stages 1 and 3: a classifier trained on the images (fixmatch.py),
# or in the imagenet preset a linear probe fit on frozen MSN features of them.
# Both fit a stage into its folder, label images, and have an oracle.


class Classifier:
    """FixMatch or FreeMatch on the pixels: stage 1, stage 3 and the baseline, each
    into run/STAGE/classifier.pt; the oracle is the same recipe on every true label."""

    def __init__(self, config, run, dataset, device, rank, world):
        self.config, self.run, self.dataset, self.device, self.rank, self.world = (config, run, dataset, device,
                                                                                  rank, world)

    def fit(self, stage, labeled_index, samples=None):
        """(model, metrics) of the stage; the samples join the labeled images (stage 3)."""
        path = os.path.join(self.run, stage, "classifier.pt")

        def make():
            settings, _ = classifier_settings(self.config, stage, out=os.path.join(self.run, stage))
            generated = None if samples is None else (samples["images"], samples["labels"])
            model, metrics = fixmatch.train(settings, self.dataset, labeled_index, generated)
            if plumbing.dist_rank() == 0:
                fixmatch.save_classifier(model, settings, metrics, path)
        return plumbing.once(path, make, lambda path: fixmatch.load_classifier(path, self.device), timed=(self.run, stage))

    def predict_training(self, model):
        return fixmatch.predict(model, self.dataset.train_x)

    def predict_samples(self, model, samples):
        return fixmatch.predict(model, samples["images"])[0]

    def embed_test(self, model):
        return None if self.dataset.test_x is None else fixmatch.embed(model, self.dataset.test_x)

    def embed_samples(self, model, samples):
        return fixmatch.embed(model, samples["images"])

    def oracle(self):
        return stage_oracle(self.config, self.dataset, self.device, self.rank, self.world)


# -----------------------------------------------------------------------------
# The run: every stage in order, then results.json and a summary table


def main():
    config = plumbing.parse_config(DPTConfig, __doc__)
    if config.report:
        return print(f"wrote {report.write_report(config.report)}")
    rank, world, device = plumbing.distributed_setup()
    asked = config.ssl_arch, config.diffusion_size  # before the preset fills them in
    resolve(config)
    check(config, world)
    if config.bench and reads_folder(config):
        return bench.bench_latent(config, device)
    if config.bench:
        return bench.bench(config, device, arch=asked[0] or "wrn28_2", size=asked[1] or "cifar",
                           presets={name: resolved(DPTConfig(preset=name)) for name in ("fast", "cifar")})
    dataset = data.load_dataset(config.dataset, config.data_dir, folders=True)
    if reads_folder(config):
        dataset = data.without_unreadable(dataset, config.skip_bad_images)
    check(config, world, dataset)
    if not config.seeds:
        return run_dpt(config, dataset, device, rank, world)
    runs = [run_dpt(replace(config, seed=seed, seeds=""), dataset, device, rank, world)
            for seed in parse_seeds(config.seeds)]
    if rank == 0:
        print(f"wrote {write_sweep(config, dataset, runs)}")


def run_dpt(config, dataset, device, rank, world):
    """One run of the three stages, resumed from its folder; returns the run folder."""
    run = run_folder(config)
    with plumbing.folder_claimed(run, rank, world):
        run_stages(config, run, dataset, device, rank, world)
    return run


def run_stages(config, run, dataset, device, rank, world):
    """Each stage in order (each skipped when done), then results.json, report.html and the summary."""
    folder = reads_folder(config)
    check_run_folder(config, run, dataset)
    if rank == 0:
        print(f"DPT on {dataset.name}, {config.labels} labels per class, preset {config.preset}: {run}")

    encoded = imagenet.stage_encode(config, run, dataset, device) if folder else None
    labeled_index = stage_split(config, run, dataset)
    learner = imagenet.Probe(config, run, dataset, encoded, device) if folder else Classifier(config, run, dataset, device,
                                                                                       rank, world)
    stage1, stage1_metrics = learner.fit("stage1", labeled_index)
    pseudo_labels = stage_pseudo_labels(run, learner, stage1, dataset)
    if folder:  # stage 2 learns the latents of every image and of its mirror
        stage_2(config, run, encoded["train"]["latents"], pseudo_labels, dataset.num_classes,
                mirrored=encoded["train"]["flipped"])
    else:
        stage_2(config, run, dataset.train_x, pseudo_labels, dataset.num_classes)
    samples = stage_sample(config, run, device, rank, world)
    _, stage3_metrics = learner.fit("stage3", labeled_index, samples)
    # The baselines of both halves: the classifier on the labeled images alone (the
    # imagenet preset's stage 1 is that already), the two reference diffusion models.
    baseline_metrics = learner.fit("baseline", labeled_index)[1] if config.baseline and not folder else None
    sample_sets = {"dpt": samples}
    if config.baseline:
        images, mirrored = ((encoded["train"]["latents"], encoded["train"]["flipped"]) if folder else
                            (dataset.train_x, None))
        references = stage_references(config, run, dataset, labeled_index, images, device, rank, world, mirrored)
        sample_sets = {"few_labels": references["few_labels"], "dpt": samples,
                       "every_label": references["every_label"]}
    fid_results = stage_fid(config, run, dataset, {name: (generated, os.path.join(run, FID_FILES[name]))
                                                   for name, generated in sample_sets.items()},
                            device, rank, world)
    oracle, oracle_metrics, oracle_path = learner.oracle()

    if rank == 0:
        # Two judges of the generated images, neither of which saw them (stage 3
        # trained on them, so it would grade its own homework): the stage-1
        # learner says what DPT believes, the oracle what is true.
        generation = judge_generation(learner, oracle, sample_sets, dataset.num_classes)
        for name, measured in fid_results.items():
            generation[name].update(fid=measured and measured["fid"],
                                    inception_score=measured and measured["inception_score"])
        write_results(config, run, dataset, device, samples, stage1_metrics=stage1_metrics,
                      pseudo_labels=pseudo_labels, stage3_metrics=stage3_metrics, baseline_metrics=baseline_metrics,
                      fid_result=fid_results["dpt"], believed=learner.predict_samples(stage1, samples),
                      true=learner.predict_samples(oracle, samples), oracle_metrics=oracle_metrics,
                      oracle_path=oracle_path, generation=generation)
    plumbing.barrier()


def write_results(config, run, dataset, device, samples, *, stage1_metrics, pseudo_labels, stage3_metrics,
                  baseline_metrics, fid_result, believed, true, oracle_metrics, oracle_path, generation):
    """results.json from what the stages measured, the judges' labels of the
    samples (believed: stage 1's, true: the oracle's) and the oracle's view of
    each diffusion model's samples (generation), report.html, and the summary."""
    believed, true = (report.sample_accuracy(judged, samples["labels"], dataset.num_classes)
                      for judged in (believed, true))
    results = {
        "dataset": dataset.name, "labels_per_class": config.labels, "seed": config.seed, "preset": config.preset,
        "classes": list(dataset.classes) or None,
        "baseline_accuracy": baseline_metrics and baseline_metrics.get("accuracy"),
        "stage1_accuracy": stage1_metrics.get("accuracy"),
        "stage1_best_accuracy": stage1_metrics.get("best_accuracy"),  # selected on the test set
        "stage1_last_moves": report.last_moves(stage1_metrics["history"]),
        "pseudo_label_accuracy": pseudo_labels.get("accuracy"),
        "stage3_accuracy": stage3_metrics.get("accuracy"),
        "stage3_best_accuracy": stage3_metrics.get("best_accuracy"),
        "stage3_last_moves": report.last_moves(stage3_metrics["history"]),
        "stage3_gain": (stage3_metrics["accuracy"] - stage1_metrics["accuracy"]
                        if "accuracy" in stage1_metrics else None),
        "fid": fid_result and fid_result["fid"], "inception_score": fid_result and fid_result["inception_score"],
        "sample_accuracy": believed["accuracy"],  # share of generated images of their intended class,
        "sample_accuracy_per_class": believed["per_class"],  # judged by the stage-1 classifier
        "oracle_sample_accuracy": true["accuracy"],  # the same, judged by the oracle
        "oracle_sample_accuracy_per_class": true["per_class"],
        "oracle_accuracy": oracle_metrics.get("accuracy"),  # the oracle's own test accuracy
        "oracle": oracle_path,
        "generation": generation,  # few_labels, dpt, every_label (the references with --baseline)
        "wall_time_s": plumbing.read_json(os.path.join(run, "timings.json")) or {},
        "config": asdict(config),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "device": plumbing.device_name(device),
        "skipped_images": len(dataset.skipped),  # unreadable, left out by --skip-bad-images
    }
    plumbing.write_json(results, os.path.join(run, "results.json"))
    if os.path.exists(os.path.join(run, "redo.json")):
        os.remove(os.path.join(run, "redo.json"))  # the redo is done: the same command would redo it again
    report.write_report(run)
    print(report.verdict(results))
    rows = report.summary_rows(results)
    width = max(len(what) for what, _ in rows)
    print("\n".join(f"  {what:<{width}}  {value}" for what, value in rows))
    print(f"everything is in {run}: report.html (open it in a browser), results.json, samples.png, samples.pt")


# -----------------------------------------------------------------------------
# Several seeds in one command: one run folder per seed, then the sweep summary
# (per seed, and mean +- standard deviation, as SSL papers report) beside them.


def parse_seeds(text):
    """[A, ..., B] from "A-B", [A, B, C] from "A,B,C": at most MOST_SEEDS distinct
    seeds, each one --seed takes; None when it is not."""
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-"))
            if not 0 <= last - first < MOST_SEEDS:  # checked before the list is made: 0-10^11 allocates nothing
                return None
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(part) for part in text.split(",")]
    except ValueError:
        return None
    valid = seeds and len(seeds) <= MOST_SEEDS and len(set(seeds)) == len(seeds) and all(map(plumbing.SEED[0], seeds))
    return seeds if valid else None


def write_sweep(config, dataset, runs):
    """OUT/<dataset>-<labels>l-seeds<A-B>.json and .html beside the run folders."""
    path = os.path.join(config.out, f"{dataset.name}-{config.labels}l-seeds{config.seeds.replace(',', '_')}")
    title = (f"DPT on {dataset.name}, {config.labels} label{'s' * (config.labels != 1)} per class, "
             f"preset {config.preset}, seeds {config.seeds}")
    return report.write_sweep(runs, path, title)


if __name__ == "__main__":
    plumbing.run_main(main)

"""dpt.py's settings: every flag with its help, the presets that fill the flags a
user leaves out, the stage each setting belongs to in a run folder, how each
reaches its stage script (--ssl-lr is fixmatch.py's --lr), and the rules that
refuse a bad one in one line before any work.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

import data
import fid
import fixmatch
import imagenet
import plumbing
import sample
import unet
from plumbing import UserError

# -----------------------------------------------------------------------------
# Configuration: a preset fills every field the user leaves out


@dataclass
class RunConfig:
    """dpt.py's own settings; DPTConfig below adds every stage script's."""
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


# The settings of each stage script that dpt.py takes, each under its stage's prefix:
# fixmatch.py's --lr is dpt.py's --ssl-lr, unet.py's --warmup its --diffusion-warmup.
# A setting's type, default, help and rule are declared once, in its stage script;
# here only its name. Unset, it is the preset's, else the stage script's default
# (resolve). (prefix, the stage script's settings, the run folder's stage, the fields)
STAGE_SETTINGS = (
    ("ssl", fixmatch.FixMatchConfig, "stage1", ("arch", "steps", "batch", "uratio", "lr", "lr_cosine", "ema",
                                                "precise_bn", "threshold", "tau", "freematch_start", "fairness",
                                                "eval_every")),
    ("stage3", fixmatch.FixMatchConfig, "stage3", ("steps", "real_fraction")),
    ("diffusion", unet.DiffusionConfig, "stage2", ("arch", "size", "images", "batch", "micro_batch", "lr", "warmup",
                                                   "ema_halflife", "p_mean", "label_dropout", "augment", "confident",
                                                   "ckpt_every")),
    ("sample", sample.SampleConfig, "sample", ("per_class", "solver", "steps", "guidance")),
)
# dpt.py's own settings that a stage script takes under the same name.
SHARED = ("dataset", "data_dir", "labels", "seed", "compile", "cuda_graphs", "bf16", "flip")
# Each stage script's name, and its settings that change nothing it makes.
SCRIPTS = {fixmatch.FixMatchConfig: ("fixmatch.py", fixmatch.FREE_TO_CHANGE),
           unet.DiffusionConfig: ("unet.py", unet.FREE_TO_CHANGE), sample.SampleConfig: ("sample.py", set())}


def stage_fields(prefix, script_config, names):
    """The DPTConfig fields of a stage script's settings: unset (None) until resolve,
    each with its type and help the stage script's, and the flag it is there."""
    declared = {field.name: field for field in dataclasses.fields(script_config)}
    comments = plumbing.field_comments(script_config)  # read from the source once a script, not once a field
    return [(f"{prefix}_{name}", declared[name].type, dataclasses.field(default=None, metadata={
        "help": f"{comments.get(name, '')} ({SCRIPTS[script_config][0]}'s --{name.replace('_', '-')})"}))
        for name in names]


DPTConfig = dataclasses.make_dataclass(
    "DPTConfig", [field for prefix, script_config, _, names in STAGE_SETTINGS
                  for field in stage_fields(prefix, script_config, names)], bases=(RunConfig,))
DPTConfig.__module__ = __name__  # made here, so that pickle and repr name it


def script_flags(script_config, *prefixes):
    """{stage script's field: the DPTConfig field that sets it}: the shared ones,
    then each prefix's (a later prefix's replace an earlier's: stage 3's steps)."""
    names = {field.name for field in dataclasses.fields(script_config)}
    flags = {name: name for name in SHARED if name in names}
    for prefix, _, _, fields in STAGE_SETTINGS:
        if prefix in prefixes:
            flags.update({name: f"{prefix}_{name}" for name in fields})
    return flags


# Each stage script's settings, its field on the left, the DPTConfig field that sets
# it on the right; a stage script's refusal names dpt.py's flag (--ssl-steps, where
# fixmatch.py would say --steps). The classifier checkpoints as often as it evaluates.
CLASSIFIER_FLAGS = {**script_flags(fixmatch.FixMatchConfig, "ssl"), "ckpt_every": "ssl_eval_every"}  # stage 1
STAGE3_FLAGS = {**script_flags(fixmatch.FixMatchConfig, "ssl", "stage3"), "ckpt_every": "ssl_eval_every"}
DIFFUSION_FLAGS = script_flags(unet.DiffusionConfig, "diffusion")  # stage 2
SAMPLE_FLAGS = script_flags(sample.SampleConfig, "sample")  # the samples
STAGE_SCRIPTS = ((fixmatch.FixMatchConfig, CLASSIFIER_FLAGS), (fixmatch.FixMatchConfig, STAGE3_FLAGS),
                 (unet.DiffusionConfig, DIFFUSION_FLAGS), (sample.SampleConfig, SAMPLE_FLAGS))

# Presets name only what they change from the stage scripts' defaults, which are
# the paper's recipe (FixMatch on WRN-28-2 for 2^20 steps, EDM's DDPM++ for 200M
# images, Heun with 35 evaluations); DPT's classifier is FreeMatch.
PRESETS = {
    # Two CPU cores, under 10 minutes, any dataset, and DPT must show: a small CNN trained with
    # FreeMatch from a global threshold of 1 beside the labeled-only baseline, a tiny U-Net that
    # folds 2x2 pixels into channels, trained at noise levels centred on sigma = 1 on the surer
    # half of each class's pseudo labels, guidance 3, half of each stage-3 labeled batch real,
    # eager fp32. Each choice and its measurement: RESULTS.md, "The tiny preset's recipe".
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


# The stages, in the order they run; dpt.py's MADE_BY says what each leaves in the
# run folder. The imagenet preset's encoding comes first, so that --redo stage1 (a
# new labeled split) keeps it.
STAGES = ("encode", "split", "stage1", "stage2", "sample", "stage3", "fid")
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
    **dict.fromkeys(("bf16", "flip", "probe_lambda"), "stage1"),
    "fid_reference": "fid",
    # a stage script's setting belongs to its stage, unless the script says it changes nothing
    **{f"{prefix}_{name}": stage for prefix, script_config, stage, names in STAGE_SETTINGS for name in names
       if name not in SCRIPTS[script_config][1]},
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
                  "cuda_graphs", "preset", "bench", "report", "seeds",
                  *(f"{prefix}_{name}" for prefix, script_config, _, names in STAGE_SETTINGS for name in names
                    if name in SCRIPTS[script_config][1])}


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
    """unet.py's settings for stage 2, and the flags they come from."""
    settings = {name: getattr(config, ours) for name, ours in DIFFUSION_FLAGS.items()}
    return unet.DiffusionConfig(**settings, out=out, labels_file=labels_file), DIFFUSION_FLAGS


def sample_settings(config, out=""):
    """sample.py's settings for the samples, and the flags they come from."""
    settings = {name: getattr(config, ours) for name, ours in SAMPLE_FLAGS.items()}
    return sample.SampleConfig(**settings, checkpoint="", out=out), SAMPLE_FLAGS


MOST_SEEDS = 1000  # runs in one sweep: a typo such as 0-10000000000 is refused, not begun


def is_redo_stage(stage):
    return stage in ("", *REDO_STAGES)  # "": redo nothing


def is_seed_list(text):
    return not text or parse_seeds(text) is not None


def is_latent_side(side):
    return side > 0 and side % 16 == 0


def is_msn_size(size):
    return size in ("", *imagenet.MSN_SIZES)  # "": chosen by the labels per class


RULES = {"dataset": data.KNOWN_DATASET, "data_dir": data.NOT_A_FILE,
         "labels": plumbing.between(1, plumbing.MOST_IMAGES),
         "seed": plumbing.SEED, "out": data.NOT_A_FILE,
         "redo": (is_redo_stage, "one of " + ", ".join(REDO_STAGES)),
         "fid_weights": plumbing.FILE_OR_EMPTY,
         "fid_reference": plumbing.between(0, plumbing.MOST_IMAGES),
         "seeds": (is_seed_list, f"A-B or A,B,C: at most {MOST_SEEDS:,} distinct seeds, each {plumbing.SEED[1]}"),
         "image_size": (is_latent_side, "a positive multiple of 16 (latents of side / 8)"),
         "autoencoder": plumbing.FILE_OR_EMPTY,
         "autoencoder_size": plumbing.one_of(*imagenet.AUTOENCODER_SIZES),
         "msn_size": (is_msn_size, "one of " + ", ".join(imagenet.MSN_SIZES)),
         "msn_weights": plumbing.FILE_OR_EMPTY,
         "probe_lambda": plumbing.POSITIVE,
         "label_subset": plumbing.FILE_OR_EMPTY,
         "fid_stats": (plumbing.is_file_or_empty, "an existing .npz file, or empty")}


def check(config, world):
    """Refuse a bad setting of any stage in one line naming its flag, before the
    dataset loads (dpt.check_dataset checks the side of its images after): the rules
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
    unet.check(settings, world, flags, resolution=config.image_size // 8 if latent else None)
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

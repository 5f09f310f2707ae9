"""Dual Pseudo Training (You et al., NeurIPS 2023) in one resumable command.

    python dpt.py --labels 1                            # CIFAR-10, 1 label per class, preset for this machine
    python dpt.py --dataset shapes --preset tiny        # the whole pipeline on a laptop CPU in minutes
    torchrun --nproc_per_node 4 dpt.py --labels 4 --preset cifar
    python dpt.py --labels 1 --redo stage2 --guidance 2  # rerun stage 2 and everything after it

Stage 1 trains FixMatch (or FreeMatch) on a few labels per class and predicts a
pseudo label for every training image; stage 2 trains a class-conditional
diffusion model on all images with those labels and samples K images per class;
stage 3 retrains the classifier from scratch with the samples joining the
labeled set. Files in the run folder are the only link between stages (see
README): a killed run, rerun with the same command, skips what is finished and
resumes what was under way from its checkpoint.
"""

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

import data
import fid
import fixmatch
import sample
import unet

# -----------------------------------------------------------------------------
# Configuration: a preset fills every field the user leaves out


@dataclass
class DPTConfig:
    dataset: str = "cifar10"        # cifar10 | cifar100 | svhn | shapes | path to a .pt/.npz file
    data_dir: str = "./data"        # where torchvision datasets are downloaded to
    labels: int = 1                 # labeled images per class
    seed: int = 0                   # seed of the labeled split and of every stage
    preset: str = ""                # tiny | fast | cifar; empty: fast with CUDA, tiny without
    out: str = "runs"               # the run lives in OUT/<dataset>-<labels>l-s<seed>
    redo: str = ""                  # rerun this stage and all after it: stage1 | stage2 | sample | stage3 | fid
    baseline: bool = False          # also train on the labeled images alone, for comparison
    fid_weights: str = ""           # FID Inception weights (else $DPT_FID_WEIGHTS, the hub cache, or download)
    bench: bool = False             # print every stage's speed on this device and the presets' projected time, and exit
    compile: bool = None            # torch.compile the networks
    bf16: bool = None               # bf16 autocast
    # stages 1 and 3: the classifier
    arch: str = None                # wrn28_2 | small
    ssl_steps: int = None           # stage-1 optimizer steps
    stage3_steps: int = None        # stage-3 optimizer steps
    ssl_batch: int = None           # labeled images per step
    uratio: int = None              # unlabeled images per labeled image
    ssl_lr: float = None            # SGD learning rate
    ssl_ema: float = None           # EMA of the classifier's weights
    threshold: str = None           # fixmatch | freematch
    tau: float = None               # FixMatch's confidence threshold
    real_fraction: float = None     # stage 3: share of real images in a labeled batch (-1: uniform)
    eval_every: int = None          # steps between test evaluations
    # stage 2: the diffusion model and its samples
    unet_arch: str = None           # unet | uvit
    unet_size: str = None           # tiny | fast | cifar
    diffusion_images: int = None    # training length in images
    diffusion_batch: int = None     # images per step
    diffusion_lr: float = None      # Adam learning rate
    warmup: int = None              # images of learning-rate warm-up
    ema_halflife: int = None        # half-life of the diffusion EMA, in images
    p_mean: float = None            # training noise levels ln(sigma) ~ N(p_mean, 1.2^2) (EDM: -1.2)
    label_dropout: float = None     # share of training labels replaced by the null class (for guidance)
    augment: float = None           # EDM's augmentation probability (its CIFAR-10 recipe: 0.12); 0: x-flips only
    per_class: int = None           # K: generated images per class
    sampler: str = None             # heun | euler | dpmpp
    sample_steps: int = None        # sampler steps (Heun: 2 N - 1 network evaluations)
    guidance: float = None          # classifier-free guidance weight (1: none)
    fid_reference: int = None       # training images FID compares against (0: all)


PRESETS = {
    # Two CPU cores, under 10 minutes, any dataset, and DPT must show. The tiny U-Net
    # folds 2x2 pixels into channels (3.5x the images/s) and sees 80,000 images at
    # noise levels centred on sigma = 1, where the class decides the shape (EDM's
    # -1.2 centres them on 0.3 and drew blobs of no class); guidance 3 makes the
    # class plain in each sample; half of each stage-3 labeled batch stays real (the
    # generated images carry stage 1's confusions; a quarter real lost on glyphs).
    # 1,000 classifier steps: after 600, stage 1 ranged from 61% to 91% over seeds,
    # and a stage 1 that has not settled gives stage 2 labels too wrong to help.
    # README, "Results", measures each of these levers. Eager fp32: on 2 CPU cores
    # compile only breaks even (13 s to compile) and neither pays for the U-Net
    # (README, "Speed").
    "tiny": dict(arch="small", ssl_steps=1000, stage3_steps=1000, ssl_batch=32, uratio=3, ssl_lr=0.05, ssl_ema=0.99,
                 threshold="fixmatch", tau=0.95, real_fraction=0.5, eval_every=500,
                 unet_arch="unet", unet_size="tiny", diffusion_images=80_000, diffusion_batch=32, diffusion_lr=2e-3,
                 warmup=1_000, ema_halflife=4_000, p_mean=0.0, label_dropout=0.1, augment=0.0, per_class=50,
                 sampler="dpmpp", sample_steps=10, guidance=3.0, fid_reference=1000, compile=False, bf16=False),
    # A few hours on one modern GPU: the paper's classifier, shorter; a smaller U-Net.
    "fast": dict(arch="wrn28_2", ssl_steps=2 ** 17, stage3_steps=2 ** 17, ssl_batch=64, uratio=7, ssl_lr=0.03,
                 ssl_ema=0.999, threshold="freematch", tau=0.95, real_fraction=-1.0, eval_every=5000,
                 unet_arch="unet", unet_size="fast", diffusion_images=20_000_000, diffusion_batch=512,
                 diffusion_lr=1e-3, warmup=2_000_000, ema_halflife=500_000, p_mean=-1.2, label_dropout=0.0,
                 augment=0.0,
                 per_class=1000, sampler="heun", sample_steps=18, guidance=1.0, fid_reference=0, compile=True,
                 bf16=True),
    # The paper's CIFAR-10 recipe: FreeMatch on WRN-28-2 for 2^20 steps, EDM's DDPM++ for 200M images.
    "cifar": dict(arch="wrn28_2", ssl_steps=2 ** 20, stage3_steps=2 ** 20, ssl_batch=64, uratio=7, ssl_lr=0.03,
                  ssl_ema=0.999, threshold="freematch", tau=0.95, real_fraction=-1.0, eval_every=5000,
                  unet_arch="unet", unet_size="cifar", diffusion_images=200_000_000, diffusion_batch=512,
                  diffusion_lr=1e-3, warmup=10_000_000, ema_halflife=500_000, p_mean=-1.2, label_dropout=0.0,
                  augment=0.12,
                  per_class=1000, sampler="heun", sample_steps=18, guidance=1.0, fid_reference=0, compile=True,
                  bf16=True),
}

# The stages in order, and the config fields each one depends on. A changed field
# can only be accepted by rerunning (--redo) its stage or an earlier one.
STAGES = ("split", "stage1", "stage2", "sample", "stage3", "fid")
FIELD_STAGE = {"dataset": "split", "labels": "split", "seed": "split",
               "arch": "stage1", "ssl_batch": "stage1", "uratio": "stage1", "ssl_lr": "stage1", "ssl_ema": "stage1",
               "tau": "stage1", "threshold": "stage1", "ssl_steps": "stage1", "bf16": "stage1",
               "unet_arch": "stage2", "unet_size": "stage2", "diffusion_images": "stage2", "diffusion_batch": "stage2",
               "diffusion_lr": "stage2", "warmup": "stage2", "ema_halflife": "stage2", "p_mean": "stage2",
               "label_dropout": "stage2", "augment": "stage2",
               "per_class": "sample", "sampler": "sample", "sample_steps": "sample", "guidance": "sample",
               "stage3_steps": "stage3", "real_fraction": "stage3", "fid_reference": "fid"}
FREE_TO_CHANGE = {"data_dir", "out", "redo", "baseline", "fid_weights", "compile", "preset", "eval_every", "bench"}


def resolve(config):
    """Fill every field the user left out from the preset."""
    if not config.preset:
        config.preset = "fast" if torch.cuda.is_available() else "tiny"
        if not torch.cuda.is_available() and dist_rank() == 0:
            print("no CUDA device: running the tiny preset (give --preset to choose)", file=sys.stderr)
    data.check_fields(config, {"preset": data.one_of(*PRESETS)})
    for name, value in PRESETS[config.preset].items():
        if getattr(config, name) is None:
            setattr(config, name, value)


# Each stage script's settings, field by field from DPTConfig's: the one mapping
# that builds them for the stages and names dpt.py's flags when a stage script's
# rules refuse a value (--ssl-steps, where fixmatch.py would say --steps).
CLASSIFIER_FIELDS = {"dataset": "dataset", "data_dir": "data_dir", "labels": "labels", "seed": "seed",
                     "arch": "arch", "batch": "ssl_batch", "uratio": "uratio", "lr": "ssl_lr", "ema": "ssl_ema",
                     "threshold": "threshold", "tau": "tau", "real_fraction": "real_fraction",
                     "eval_every": "eval_every", "ckpt_every": "eval_every", "compile": "compile", "bf16": "bf16"}
DIFFUSION_FIELDS = {"dataset": "dataset", "data_dir": "data_dir", "seed": "seed", "arch": "unet_arch",
                    "size": "unet_size", "images": "diffusion_images", "batch": "diffusion_batch",
                    "lr": "diffusion_lr", "warmup": "warmup", "ema_halflife": "ema_halflife", "p_mean": "p_mean",
                    "label_dropout": "label_dropout", "augment": "augment", "compile": "compile", "bf16": "bf16"}
SAMPLE_FIELDS = {"per_class": "per_class", "sampler": "sampler", "steps": "sample_steps", "guidance": "guidance",
                 "seed": "seed", "bf16": "bf16"}


def settings_from(config_class, config, fields, **fixed):
    return config_class(**{name: getattr(config, ours) for name, ours in fields.items()}, **fixed)


def classifier_settings(config, stage, out=""):
    """fixmatch.py's settings for stage 1, stage 3 or the baseline, and the flags
    they come from. One recipe for all three: the baseline drops the unlabeled
    loss (lambda_u = 0), which is what makes it train on the labeled images alone."""
    fields = dict(CLASSIFIER_FIELDS, steps="stage3_steps" if stage == "stage3" else "ssl_steps")
    lambda_u = 0.0 if stage == "baseline" else 1.0
    return settings_from(fixmatch.FixMatchConfig, config, fields, out=out, lambda_u=lambda_u), fields


def diffusion_settings(config, out="", labels_file=""):
    """unet.py's settings for stage 2, and the flags they come from: a checkpoint
    every 5% of the run (at most 2M images apart), a preview grid halfway and at the end."""
    settings = settings_from(unet.DiffusionConfig, config, DIFFUSION_FIELDS, out=out, labels_file=labels_file,
                              ckpt_every=min(max(config.diffusion_images // 20, 1), 2_000_000),
                              grid_every=max(config.diffusion_images // 2, 1))
    return settings, DIFFUSION_FIELDS


def sample_settings(config, out=""):
    return settings_from(sample.SampleConfig, config, SAMPLE_FIELDS, checkpoint="", out=out), SAMPLE_FIELDS


RULES = {"dataset": data.DATASET, "data_dir": data.FOLDER, "labels": data.at_least(1), "seed": data.at_least(0),
         "out": data.FOLDER, "redo": ((lambda stage: stage in ("", *STAGES[1:])), "one of " + ", ".join(STAGES[1:])),
         "fid_weights": ((lambda path: not path or os.path.isfile(path)), "an existing file, or empty"),
         "fid_reference": data.at_least(0)}


def check(config, world, dataset=None):
    """Refuse a bad setting of any stage in one line naming its flag, before the
    dataset loads (and again with the dataset, before any stage runs): the rules
    are dpt.py's own and the stage scripts', which check their own flags the same way."""
    data.check_fields(config, RULES)
    for stage in ("stage1", "stage3"):
        settings, flags = classifier_settings(config, stage)
        fixmatch.check(settings, world, flags)
    settings, flags = diffusion_settings(config)
    unet.check(settings, world, flags, resolution=None if dataset is None else dataset.train_x.shape[-1])
    sample.check(*sample_settings(config))
    if dataset is not None:
        data.labeled_split(dataset.train_y, config.labels, config.seed)  # an impossible --labels


def run_folder(config):
    name = os.path.splitext(os.path.basename(config.dataset.rstrip("/")))[0]
    return os.path.join(config.out, f"{name}-{config.labels}l-s{config.seed}")


def dist_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# The run folder: the file that marks each stage done, what --redo removes,
# and refusing a folder made with other settings

FINAL = {"split": "split.pt", "stage1": "pseudo_labels.pt", "stage2": "stage2/diffusion.pt",
         "sample": "samples.pt", "stage3": "stage3/classifier.pt", "baseline": "baseline/classifier.pt",
         "fid": "fid.json"}
REMOVED_BY_REDO = {"stage1": ("stage1", "pseudo_labels.pt", "baseline"), "stage2": ("stage2",),
                   "sample": ("samples.pt", "samples.png"), "stage3": ("stage3",), "fid": ("fid.json",)}


def check_run_folder(config, run):
    """Refuse settings that differ from the ones this run folder was made with,
    unless --redo reruns the first stage they affect; then remove that stage's
    files and those of every later stage."""
    path = os.path.join(run, "config.json")
    settings = {k: v for k, v in asdict(config).items() if k not in FREE_TO_CHANGE}
    saved = read_json(path)
    redo_from = STAGES.index(config.redo) if config.redo else len(STAGES)
    if saved is not None:
        changed = sorted(k for k, v in settings.items() if saved.get(k) != v)
        earliest = min((STAGES.index(FIELD_STAGE[k]) for k in changed), default=len(STAGES))
        if earliest < redo_from:
            raise data.UserError(f"{run} was made with other settings ({', '.join(changed)}); add "
                                 f"--redo {STAGES[max(earliest, 1)]} to rerun from the stage they change, "
                                 "or choose another --out")
    barrier()  # every rank has compared before rank 0 removes anything
    if dist_rank() == 0:
        removed = STAGES[redo_from:] if saved is not None else ()
        for name in [name for stage in removed for name in REMOVED_BY_REDO[stage]] + ["results.json"]:
            target = os.path.join(run, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        timings = {k: v for k, v in (read_json(os.path.join(run, "timings.json")) or {}).items() if k not in removed}
        write_json(timings, os.path.join(run, "timings.json"))
        write_json(settings, path)
    barrier()


def read_json(path):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise data.UserError(f"{path} is unreadable ({type(error).__name__}); delete it, or the run "
                             "folder to start over") from None


def write_json(obj, path):
    data.save_atomic(obj, path, writer=lambda obj, file: file.write(json.dumps(obj, indent=2).encode()))


def read_artifact(path, redo):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise data.UserError(f"{path} is unreadable ({type(error).__name__}); rerun with --redo {redo}") from None


def run_stage(run, stage, function, *args, **kwargs):
    """Run one stage (it skips itself when its final file exists); add its wall
    time to timings.json when it did work."""
    already_done = os.path.exists(os.path.join(run, FINAL[stage]))
    start = time.perf_counter()
    result = function(*args, **kwargs)
    if not already_done and dist_rank() == 0:
        timings = read_json(os.path.join(run, "timings.json")) or {}
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 1)
        write_json(timings, os.path.join(run, "timings.json"))
    return result


# -----------------------------------------------------------------------------
# The stages. Each reads its inputs from the run folder and leaves its outputs
# there; a stage whose final file exists is skipped, one with a ckpt.pt resumes.


def stage_split(config, run, dataset):
    path = os.path.join(run, FINAL["split"])
    if not os.path.exists(path) and dist_rank() == 0:
        index = data.labeled_split(dataset.train_y, config.labels, config.seed)
        data.save_atomic({"indices": index, "seed": config.seed, "dataset": dataset.name,
                          "size": len(dataset.train_y)}, path)
    barrier()
    return read_artifact(path, "stage1")["indices"]


def stage_classifier(config, run, stage, dataset, labeled_index, pseudo=None):
    """Stage 1, stage 3 or the labeled-only baseline, into run/stage/classifier.pt;
    returns the classifier and its metrics."""
    path = os.path.join(run, stage, "classifier.pt")
    if not os.path.exists(path):
        settings, _ = classifier_settings(config, stage, out=os.path.join(run, stage))
        model, metrics = fixmatch.train(settings, dataset, labeled_index, pseudo)
        if dist_rank() == 0:
            fixmatch.save_classifier(model, settings, metrics, path)
    barrier()
    return fixmatch.load_classifier(path)


def stage_1(config, run, dataset, labeled_index):
    """FixMatch on the labeled split, then a pseudo label for every training image;
    returns the classifier (the judge of the generated images), its metrics and the labels."""
    model, metrics = stage_classifier(config, run, "stage1", dataset, labeled_index)
    path = os.path.join(run, FINAL["stage1"])
    if not os.path.exists(path) and dist_rank() == 0:
        data.save_atomic(fixmatch.pseudo_labels(model, dataset), path)
    barrier()
    return model, metrics, read_artifact(path, "stage1")


def stage_2(config, run, dataset, pseudo):
    """The class-conditional diffusion model, trained on every training image with its pseudo label."""
    out = os.path.join(run, "stage2")
    path = os.path.join(run, FINAL["stage2"])
    if not os.path.exists(path):
        settings, _ = diffusion_settings(config, out=out, labels_file=os.path.join(run, FINAL["stage1"]))
        grid = os.path.join(out, "grid.png")
        preview = lambda model, images_seen: sample.preview_grid(model, grid, per_class=4, steps=8)
        model, metrics = unet.train(settings, dataset.train_x, pseudo["labels"], dataset.num_classes, preview=preview)
        if dist_rank() == 0:
            unet.save_diffusion(model, settings, metrics, path)
    barrier()


def stage_sample(config, run, device, rank, world):
    """K images per class from the diffusion model's EMA weights, split across ranks."""
    path = os.path.join(run, FINAL["sample"])
    if not os.path.exists(path):
        model = unet.load_diffusion(os.path.join(run, FINAL["stage2"]), device)
        settings, _ = sample_settings(config, out=run)
        images, labels = sample.generate(model, settings.per_class, sampler=settings.sampler, steps=settings.steps,
                                         guidance=settings.guidance, seed=settings.seed, device=device, rank=rank,
                                         world=world, bf16=settings.bf16)
        if rank == 0:
            data.save_atomic({"images": images, "labels": labels}, path)
            sample.save_grid(images, labels, os.path.join(run, "samples.png"))
    barrier()
    return read_artifact(path, "sample")


def split_statistics(model, images, keep_logits, rank, world):
    """Inception statistics of `images`, each rank taking every world-th image."""
    part = fid.statistics(model, images[rank::world].split(200), keep_logits=keep_logits)
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


def stage_fid(config, run, dataset, samples, device, rank, world):
    """FID and IS of the samples against the training images; None, with a
    notice, when the Inception weights cannot be had."""
    path = os.path.join(run, FINAL["fid"])
    if not os.path.exists(path):
        try:
            model = fid.load_inception(config.fid_weights or None, device)
        except fid.FIDError as error:
            if rank == 0:
                print(f"FID skipped: {error}", file=sys.stderr)
            return None
        reference = dataset.train_x[:config.fid_reference or None]
        real = split_statistics(model, reference, False, rank, world)
        generated = split_statistics(model, samples["images"], True, rank, world)
        if rank == 0:
            write_json({"fid": fid.frechet_distance(generated["mu"], generated["sigma"], real["mu"], real["sigma"]),
                        "inception_score": fid.inception_score(generated["logits"])[0],
                        "generated_images": generated["count"], "reference_images": real["count"]}, path)
        barrier()
    return read_json(path)


# -----------------------------------------------------------------------------
# The run: every stage in order, then results.json and a summary table


def main():
    config = data.parse_config(DPTConfig, __doc__)
    rank, world, device = data.distributed_setup()
    asked = config.arch, config.unet_size  # before the preset fills them in
    resolve(config)
    check(config, world)
    if config.bench:
        return bench(config, device, arch=asked[0] or "wrn28_2", size=asked[1] or "cifar")
    dataset = data.load_dataset(config.dataset, config.data_dir)
    check(config, world, dataset)
    run = run_folder(config)
    data.claim_folder(run, rank, world)
    check_run_folder(config, run)
    if rank == 0:
        print(f"DPT on {dataset.name}, {config.labels} labels per class, preset {config.preset}: {run}")

    labeled_index = run_stage(run, "split", stage_split, config, run, dataset)
    stage1_model, stage1_metrics, pseudo = run_stage(run, "stage1", stage_1, config, run, dataset, labeled_index)
    run_stage(run, "stage2", stage_2, config, run, dataset, pseudo)
    samples = run_stage(run, "sample", stage_sample, config, run, device, rank, world)
    _, stage3_metrics = run_stage(run, "stage3", stage_classifier, config, run, "stage3", dataset, labeled_index,
                                  pseudo=(samples["images"], samples["labels"]))
    baseline_metrics = None
    if config.baseline:
        _, baseline_metrics = run_stage(run, "baseline", stage_classifier, config, run, "baseline", dataset,
                                        labeled_index)
    fid_result = run_stage(run, "fid", stage_fid, config, run, dataset, samples, device, rank, world)

    if rank == 0:
        # The judge of the generated images is the stage-1 classifier: it never saw
        # them (stage 3 trained on them, so it would grade its own homework).
        fidelity = sample_accuracy(stage1_model, samples["images"], samples["labels"], dataset.num_classes)
        results = {
            "dataset": dataset.name, "labels_per_class": config.labels, "seed": config.seed, "preset": config.preset,
            "baseline_accuracy": baseline_metrics and baseline_metrics.get("accuracy"),
            "stage1_accuracy": stage1_metrics.get("accuracy"),
            "stage1_best_accuracy": stage1_metrics.get("best_accuracy"),  # selected on the test set
            "pseudo_label_accuracy": pseudo.get("accuracy"),
            "stage3_accuracy": stage3_metrics.get("accuracy"),
            "stage3_best_accuracy": stage3_metrics.get("best_accuracy"),
            "stage3_gain": (stage3_metrics["accuracy"] - stage1_metrics["accuracy"]
                            if "accuracy" in stage1_metrics else None),
            "fid": fid_result and fid_result["fid"], "inception_score": fid_result and fid_result["inception_score"],
            "sample_accuracy": fidelity["accuracy"],  # share of generated images of their intended class
            "sample_accuracy_per_class": fidelity["per_class"],  # both judged by the stage-1 classifier
            "wall_time_s": read_json(os.path.join(run, "timings.json")),
            "config": asdict(config),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
            "device": data.device_name(device),
        }
        write_json(results, os.path.join(run, "results.json"))
        print_summary(results, run)


# -----------------------------------------------------------------------------
# The benchmark: each stage's speed, and what the GPU presets would take here


def bench(config, device, arch, size):
    """One row per stage with this run's settings (compile and bf16 as the
    preset or the flags set them) beside the same code eager in fp32, as the
    official code runs (TorchSSL and EDM); then the fast and cifar presets'
    projected wall time from the measured rates. A CPU runs small batches and
    few steps (each row's size is printed); rates are per image, so they project.
    The networks are the paper's (WRN-28-2, the cifar size) unless --arch and
    --unet-size ask for others."""
    on_cuda = device.type == "cuda"
    fast = (config.compile, config.bf16)  # filled in by the preset
    ssl_batch, diffusion_batch, steps = (64, 128, 12) if on_cuda else (4, 2, 3)

    def measure(run, settings):
        """(rate, peak device memory in GiB or None) of run(compile, bf16)."""
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        rate = run(*settings)
        return rate, torch.cuda.max_memory_allocated() / 2 ** 30 if on_cuda else None

    classifier = lambda compile, bf16: fixmatch.training_rate(fixmatch.FixMatchConfig(
        arch=arch, batch=ssl_batch, uratio=7, compile=compile, bf16=bf16), steps=steps + 5)
    diffusion = lambda arch: lambda compile, bf16: unet.training_rate(unet.DiffusionConfig(
        arch=arch, size=size, batch=diffusion_batch, compile=compile, bf16=bf16), steps=steps + 2)
    model = unet.make_diffusion("unet", size, 10, 32).to(device).eval()
    heun = lambda compile, bf16: sample.heun_rate(model, 1 if not on_cuda else 100, device, bf16=bf16,
                                                  steps=18 if on_cuda else 2)
    inception = fid.for_inference(fid.FIDInception(), device)
    images = torch.randint(0, 256, (100 if on_cuda else 8, 3, 32, 32), dtype=torch.uint8, device=device)
    features = lambda compile, bf16: fid.feature_rates({"ours": lambda: inception(images)}, len(images),
                                                       device.type, repeats=3)["ours"]
    augment = lambda compile, bf16: data.augmentation_rate(lambda x: data.strong_augment(data.weak_augment(x)),
                                                           65536 if on_cuda else 1024, device.type)
    per_step = ssl_batch * (1 + 2 * 7)  # images through the classifier per step
    # (row, what it runs, unit, whether compile and bf16 apply to it)
    rows = [("augmentation, weak + strong", augment, "images/s", False),
            (f"FixMatch {arch}, {ssl_batch} + 2 x {7 * ssl_batch}", classifier, "steps/s", True),
            (f"U-Net {size} training, batch {diffusion_batch}", diffusion("unet"), "images/s", True),
            (f"U-ViT {size} training, batch {diffusion_batch}", diffusion("uvit"), "images/s", True),
            (f"Heun, 35 evaluations, U-Net {size}", heun, "images/s", True),
            ("FID features (always eager fp32)", features, "images/s", False)]
    where = data.device_name(device)
    print(f"{where}: compile={fast[0]}, bf16={fast[1]}, beside eager fp32")
    print(f"  {'stage':<40} {'rate':>10} {'eager fp32':>10} {'ratio':>6}  {'unit':<9} peak memory")
    measured = []
    for name, run, unit, optimizable in rows:
        rate, memory = measure(run, fast)
        baseline = measure(run, (False, False))[0] if optimizable and fast != (False, False) else rate
        measured.append(rate)
        print(f"  {name:<40} {rate:>10,.1f} {baseline:>10,.1f} {rate / baseline:>5.2f}x  {unit:<9} "
              f"{'-' if memory is None else f'{memory:.1f} GiB'}")
    rate = dict(zip(("augment", "classifier", "unet", "uvit", "heun", "fid"), measured))
    for name in ("unet", "uvit"):
        mfu = unet.flop_utilisation(unet.make_diffusion(name, size, 10, 32), rate[name], device)
        if mfu is not None:
            print(f"  {name} {size}: model FLOP utilisation {100 * mfu:.1f}% of the bf16 peak")

    # Projection: every stage's work at its measured rate; a preset's U-Net of
    # another size than the one measured is scaled by forward FLOPs.
    if arch != "wrn28_2":
        return print("the presets' projected time needs the classifier they train: leave out --arch")
    flops = unet.flops_per_image(unet.make_diffusion("unet", size, 10, 32))
    paper_steps_per_second = rate["classifier"] * per_step / (64 * 15)  # at 64 + 2 x 448 images a step
    for preset in ("fast", "cifar"):
        settings = DPTConfig(preset=preset)
        resolve(settings)
        scale = flops / unet.flops_per_image(unet.make_diffusion(settings.unet_arch, settings.unet_size, 10, 32))
        evaluations = 2 * settings.sample_steps - 1
        seconds = {"stages 1 and 3": (settings.ssl_steps + settings.stage3_steps) / paper_steps_per_second,
                   "stage 2": settings.diffusion_images / (rate["unet"] * scale),
                   "sampling": settings.per_class * 10 * evaluations / 35 / (rate["heun"] * scale),
                   "FID": 60_000 / rate["fid"]}
        print(f"{preset} preset here: {sum(seconds.values()) / 3600:,.1f} h (" +
              ", ".join(f"{stage} {time / 3600:,.1f} h" for stage, time in seconds.items()) + ")")


def sample_accuracy(judge, images, labels, num_classes):
    """The share of generated images that the judge puts in the class they were
    generated for, overall and per class (None for a class with no images)."""
    right = fixmatch.predict(judge, images)[0] == labels
    per_class = [right[labels == c].float().mean().item() if (labels == c).any() else None
                 for c in range(num_classes)]
    return {"accuracy": right.float().mean().item(), "per_class": per_class}


def print_summary(results, run):
    percent = lambda value: "-" if value is None else f"{100 * value:.2f}%"
    rows = [("labeled images only (--baseline)", percent(results["baseline_accuracy"])),
            ("stage 1: semi-supervised", percent(results["stage1_accuracy"])),
            ("pseudo labels of the training images", percent(results["pseudo_label_accuracy"])),
            ("generated images of the intended class", percent(results["sample_accuracy"]) + " (stage-1 judge)"),
            ("stage 3: with generated images", percent(results["stage3_accuracy"])),
            ("gain of stage 3 over stage 1", "-" if results["stage3_gain"] is None
             else f"{100 * results['stage3_gain']:+.2f} points"),
            ("FID of the samples", "-" if results["fid"] is None else f"{results['fid']:.2f}"),
            ("wall time", f"{sum(results['wall_time_s'].values()) / 60:.1f} min")]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"  {name:<{width}}  {value}" for name, value in rows))
    print(f"everything is in {run}: results.json, samples.png, samples.pt, pseudo_labels.pt")


if __name__ == "__main__":
    data.run_main(main)

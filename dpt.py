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
from dataclasses import asdict, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

import bench
import configuration
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

    def make():  # the dataset's contents are read only to draw a split
        plumbing.save_atomic({"indices": labeled_split(config, dataset), "seed": config.seed, "dataset": dataset.name,
                              "size": len(dataset.train_y), "contents": contents_crc(dataset)}, path)
    split = plumbing.once(path, make, partial(plumbing.read_artifact, redo="stage1"), every_rank=False,
                          timed=(run, "split"))
    return split["indices"]  # one kept from an earlier command: of this data (check_kept)


def stage_pseudo_labels(run, learner, model, dataset):
    """Stage 1's last step: its learner's label and confidence for every training image."""
    path = os.path.join(run, "pseudo_labels.pt")

    def make():
        plumbing.save_atomic(fixmatch.pseudo_labels(learner.predict_training(model), dataset.train_y), path)
    return plumbing.once(path, make, partial(plumbing.read_artifact, redo="stage1"), every_rank=False,
                         timed=(run, "stage1"))


def stage_diffusion(config, run, images, dataset, mirrored=None):
    """The class-conditional diffusion model, trained on every training image
    (pixels, or the imagenet preset's latents and their mirrors') with its pseudo
    label, or with the null class where stage 1 was among the least sure of a
    class: the labels `python unet.py --labels-file pseudo_labels.pt` trains on."""
    out = os.path.join(run, "stage2")
    settings = configuration.diffusion_settings(config, out=out, labels_file=os.path.join(run, "pseudo_labels.pt"))[0]

    def make():
        train_diffusion(settings, images, unet.training_labels(settings, dataset), dataset.num_classes, mirrored)
    plumbing.once(os.path.join(out, "diffusion.pt"), make, timed=(run, "stage2"))


def train_diffusion(settings, images, labels, num_classes, mirrored=None):
    """unet.py's training on these labels (the null class: num_classes) into
    settings.out/diffusion.pt, resumed from its ckpt.pt; a preview grid halfway and at the end."""
    def preview(model, images_seen):
        sample.preview_grid(model, os.path.join(settings.out, "grid.png"), per_class=4, steps=8)
    pixels = images.dtype == torch.uint8  # latents would need decoding first: no preview
    model, metrics = unet.train(settings, images, labels, num_classes, preview=preview if pixels else None,
                                preview_every=max(settings.images // 2, 1), mirrored=mirrored)
    if plumbing.dist_rank() == 0:
        unet.save_diffusion(model, settings, metrics, os.path.join(settings.out, "diffusion.pt"))


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
        settings, _ = configuration.sample_settings(config, out=folder)
        decode = None
        if configuration.reads_folder(config):
            autoencoder = imagenet.load_autoencoder(config.autoencoder, config.autoencoder_size, device)
            decode = partial(imagenet.decode_latents, autoencoder)
        # Decoded images (the imagenet preset's: 25 GB) are gathered to process 0 alone, with their features.
        images, labels = sample.sample_images(settings, model, device, rank, world, decode, gather=decode is None)
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
    return plumbing.once(path, make, partial(plumbing.read_artifact, redo="sample", mmap=True), timed=timed)


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
            model = fid.load_inception(config.fid_weights or None, device, flag="--fid-weights")
            stats = config.fid_stats or config.dataset == "imagenet" and fid.download_stats(fid.ADM_IMAGENET256)
            real = fid.read_stats(stats) if stats else None
        except fid.FIDError as error:
            if rank == 0:
                print(f"FID skipped: {error}", file=sys.stderr)
            return
        if real is None and dataset.train_x is None:  # a folder: a fixed random subset of its files
            order = torch.randperm(len(dataset.train_files), generator=torch.Generator().manual_seed(0))
            files = [dataset.train_files[i] for i in order[:config.fid_reference or None]]
            real = split_statistics(model, files, False, rank, world, read=partial(imagenet.read_image, config))
        elif real is None:
            real = split_statistics(model, dataset.train_x[:config.fid_reference or None], False, rank, world)
        for name, (samples, path) in missing.items():
            generated = samples["images"]
            if configuration.reads_folder(config):
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
    settings, _ = configuration.classifier_settings(config, "stage1")
    settings = replace(settings, seed=ORACLE_SEED, lambda_u=0.0, batch=settings.batch * (1 + 2 * settings.uratio),
                       real_fraction=-1.0, labels=int(torch.bincount(dataset.train_y).max()))
    ignored = fixmatch.FREE_TO_CHANGE | fixmatch.UNLABELED_ONLY | {"dataset"}
    recipe = {k: v for k, v in asdict(settings).items() if k not in ignored}
    name = f"{dataset.name}-{config.ssl_arch}-{contents_crc(dataset):08x}-{zlib.crc32(json.dumps(recipe).encode()):08x}"
    return replace(settings, out=os.path.join(config.out, "oracle", name))


def stage_oracle(config, dataset, device, rank, world):
    """The oracle, its metrics and its file: trained on first use, loaded afterwards."""
    settings = oracle_settings(config, dataset)
    path = os.path.join(settings.out, "classifier.pt")

    def train():
        model, metrics = fixmatch.train(settings, dataset, torch.arange(len(dataset.train_y)))
        if rank == 0:
            fixmatch.save_classifier(model, settings, metrics, path)
    once_for_every_run(path, train, f"the oracle for {dataset.name}", rank, world)
    return (*fixmatch.load_classifier(path, device), path)


def once_for_every_run(path, make, what, rank, world):
    """What the runs on one dataset share (the oracle, the every-label model): made
    by the first run that needs it, under its folder's lock, so that a run that
    finds another making it waits, then finds it made."""
    if os.path.exists(path):
        return
    folder = os.path.dirname(path)
    with plumbing.folder_claimed(folder, rank, world, wait=True):
        if not os.path.exists(path):  # not finished by the run we waited for
            if rank == 0:
                print(f"training {what} once: {folder}", file=sys.stderr)
            make()
        plumbing.barrier()


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
    settings, _ = configuration.diffusion_settings(config)
    ignored = unet.FREE_TO_CHANGE | {"dataset", "confident", "seed"}
    recipe = {k: v for k, v in asdict(settings).items() if k not in ignored}
    name = f"{dataset.name}-{contents_crc(dataset):08x}-{zlib.crc32(json.dumps(recipe).encode()):08x}"
    return os.path.join(config.out, "every_label", name)


def stage_references(config, run, dataset, labeled_index, images, device, rank, world, mirrored=None):
    """{"few_labels": samples, "every_label": samples}: each reference trained
    (or loaded) and sampled into the run folder."""
    few = os.path.join(run, "few_labels")
    every = every_label_folder(config, dataset)

    def train_few():
        conditions = few_label_conditions(dataset.train_y, labeled_index, dataset.num_classes)
        train_diffusion(configuration.diffusion_settings(config, out=few)[0], images, conditions, dataset.num_classes,
                        mirrored)

    def train_every():
        settings = replace(configuration.diffusion_settings(config, out=every)[0], seed=EVERY_LABEL_SEED)
        train_diffusion(settings, images, dataset.train_y, dataset.num_classes, mirrored)
    plumbing.once(os.path.join(few, "diffusion.pt"), train_few, timed=(run, "few_labels"))
    once_for_every_run(os.path.join(every, "diffusion.pt"), train_every,
                       f"the every-label diffusion model for {dataset.name}", rank, world)
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
            settings, _ = configuration.classifier_settings(self.config, stage, out=os.path.join(self.run, stage))
            generated = None if samples is None else (samples["images"], samples["labels"])
            model, metrics = fixmatch.train(settings, self.dataset, labeled_index, generated)
            if plumbing.dist_rank() == 0:
                fixmatch.save_classifier(model, settings, metrics, path)
        return plumbing.once(path, make, partial(fixmatch.load_classifier, device=self.device),
                             timed=(self.run, stage))

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
    config = plumbing.parse_config(configuration.DPTConfig, __doc__)
    if config.report:
        return print(f"wrote {report.write_report(config.report)}")
    rank, world, device = plumbing.distributed_setup()
    asked = config.ssl_arch, config.diffusion_size  # before the preset fills them in
    configuration.resolve(config)
    configuration.check(config, world)
    if config.bench and configuration.reads_folder(config):
        return bench.bench_latent(config, device)
    if config.bench:
        return bench.bench(config, device, arch=asked[0] or "wrn28_2", size=asked[1] or "cifar",
                           presets={name: configuration.resolved(configuration.DPTConfig(preset=name))
                                    for name in ("fast", "cifar")})
    if configuration.reads_folder(config):
        dataset = imagenet.without_unreadable(imagenet.load_folder(config.dataset, config.data_dir),
                                              config.skip_bad_images)
    else:
        dataset = data.load_dataset(config.dataset, config.data_dir)
    check_dataset(config, world, dataset)
    if not config.seeds:
        return run_dpt(config, dataset, device, rank, world)
    runs = [run_dpt(replace(config, seed=seed, seeds=""), dataset, device, rank, world)
            for seed in configuration.parse_seeds(config.seeds)]
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
    folder = configuration.reads_folder(config)
    check_run_folder(config, run, dataset)
    if rank == 0:
        print(f"DPT on {dataset.name}, {config.labels} labels per class, preset {config.preset}: {run}")

    encoded = imagenet.stage_encode(config, run, dataset, device) if folder else None
    labeled_index = stage_split(config, run, dataset)
    learner = (imagenet.Probe(config, run, dataset, encoded, device) if folder else
               Classifier(config, run, dataset, device, rank, world))
    stage1, stage1_metrics = learner.fit("stage1", labeled_index)
    pseudo_labels = stage_pseudo_labels(run, learner, stage1, dataset)
    if folder:  # stage 2 learns the latents of every image and of its mirror
        stage_diffusion(config, run, encoded["train"]["latents"], dataset, mirrored=encoded["train"]["flipped"])
    else:
        stage_diffusion(config, run, dataset.train_x, dataset)
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
        results = collect_results(config, run, dataset, device, samples, stage1_metrics=stage1_metrics,
                                  pseudo_labels=pseudo_labels, stage3_metrics=stage3_metrics,
                                  baseline_metrics=baseline_metrics, fid_result=fid_results["dpt"],
                                  believed=learner.predict_samples(stage1, samples),
                                  true=learner.predict_samples(oracle, samples), oracle_metrics=oracle_metrics,
                                  oracle_path=oracle_path, generation=generation)
        plumbing.write_json(results, os.path.join(run, "results.json"))
        finish_redo(run)
        report.write_report(run)
        report.print_summary(results, run)
    plumbing.barrier()


def collect_results(config, run, dataset, device, samples, *, stage1_metrics, pseudo_labels, stage3_metrics,
                    baseline_metrics, fid_result, believed, true, oracle_metrics, oracle_path, generation):
    """results.json's contents: what the stages measured, the judges' labels of the
    samples (believed: stage 1's, true: the oracle's) and the oracle's view of each
    diffusion model's samples (generation)."""
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
    return results


# -----------------------------------------------------------------------------
# Several seeds in one command: one run folder per seed, then the sweep summary
# (per seed, and mean +- standard deviation, as SSL papers report) beside them.


def write_sweep(config, dataset, runs):
    """OUT/<dataset>-<labels>l-seeds<A-B>.json and .html beside the run folders."""
    path = os.path.join(config.out, f"{dataset.name}-{config.labels}l-seeds{config.seeds.replace(',', '_')}")
    title = (f"DPT on {dataset.name}, {config.labels} label{'s' * (config.labels != 1)} per class, "
             f"preset {config.preset}, seeds {config.seeds}")
    return report.write_sweep(runs, path, title)


# -----------------------------------------------------------------------------
# The run folder: refusing one made with other settings, removing what a --redo
# reruns (every stage's pattern, the missing work done once, then loaded: plumbing.once)


def check_dataset(config, world, dataset):
    """Refuse, before any stage runs, what the dataset makes impossible: every
    stage's settings against the side of its images, a --labels it cannot give, samples
    that would not fit in memory, and too few images for FID on each process."""
    if dataset.train_x is not None:  # every other setting was checked before the dataset loaded
        settings, flags = configuration.diffusion_settings(config)
        unet.check(settings, world, flags, resolution=dataset.train_x.shape[-1])
    labeled_split(config, dataset)  # an impossible --labels, or a subset file that does not fit
    # FID's covariances need 2 images on every process, of the reference and of the samples.
    reference = min(config.fid_reference or len(dataset.train_y), len(dataset.train_y))
    generated = config.sample_per_class * dataset.num_classes
    # the samples' side, decoded
    pixels = config.image_size if configuration.reads_folder(config) else dataset.train_x.shape[-1]
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


# The run folder's rules, one row a stage in the order the stages run: what the
# stage makes there, which a --redo of it or of an earlier stage removes. A stage is
# done when its last file exists (stage_* below name it). The baseline's files go
# with stage 1, whose split it trains on, and the references' with stage 2, whose
# recipe they train with, and with the samples.
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


def first_to_rerun(config, run, settings, saved):
    """The index in configuration.STAGES of the first stage this run reruns (len(configuration.STAGES): none),
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
    first = configuration.STAGES.index(redo) if redo else len(configuration.STAGES)
    changed = sorted(k for k, v in settings.items() if saved is not None and saved.get(k) != v)
    stages = configuration.STAGES
    earliest = min((stages.index(configuration.FIELD_STAGE[k]) for k in changed), default=len(stages))
    if earliest < first:
        stage = "stage1" if configuration.STAGES[earliest] == "split" else configuration.STAGES[earliest]
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
    settings = {k: v for k, v in asdict(config).items() if k not in configuration.FREE_TO_CHANGE}
    return {**settings, **{name: plumbing.file_identity(getattr(config, name)) for name in configuration.FILE_SETTINGS}}


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
        saved = {**{k: v for k, v in configuration.ADDED_SINCE.items() if k in settings},
                 **{k: settings[k] for k in configuration.FILE_SETTINGS}, **saved}
        saved = {k: v for k, v in saved.items() if k not in configuration.FREE_TO_CHANGE}
    first = first_to_rerun(config, run, settings, saved)
    pending = plumbing.read_json(os.path.join(run, "redo.json"),  # a --redo begun and not finished
                                 advice="remove it and run the same command again (a --redo begins again)")
    resumed = config.redo and saved == settings and pending == {"redo": config.redo}
    removed = configuration.STAGES[first:] if saved is not None and not resumed else ()
    check_kept(config, run, dataset, configuration.STAGES[:first], removed)
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


def finish_redo(run):
    """The run is done: a --redo is no longer under way (redo.json), so the same
    command will redo it again rather than resume it."""
    if os.path.exists(os.path.join(run, "redo.json")):
        os.remove(os.path.join(run, "redo.json"))


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
            changed := imagenet.folder_changes((encoded[split] or {}).get("files", []),
                                               imagenet.file_records(files, dataset.root))))
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

    def made_again(name):
        return not os.path.exists(path(name)) or any(name == made or name.startswith(made + "/")
                                                     for stage in removed for made in MADE_BY[stage])
    decoded = ["samples.pt"] + ["few_labels/samples.pt", "every_label/samples.pt"] * bool(config.baseline)
    if configuration.reads_folder(config) and any(made_again(name) for name in ["encoded.pt", *decoded]):
        imagenet.msn_for(config, "cpu"), imagenet.load_autoencoder(config.autoencoder, config.autoencoder_size)


if __name__ == "__main__":
    plumbing.run_main(main)

"""Stages 1 and 3 of DPT: a semi-supervised classifier trained with FixMatch
(Sohn et al. 2020), optionally with FreeMatch's self-adaptive threshold and
fairness loss (Wang et al. 2023), on a few labels per class; then a pseudo
label for every training image.

    python fixmatch.py --dataset shapes --labels 4 --arch small --steps 700 --batch 32 --uratio 3 --ema 0.99 --lr 0.05
    python fixmatch.py --dataset cifar10 --labels 4 --threshold freematch   # the paper's recipe
    python fixmatch.py --bench                                              # steps/s of WRN-28-2

The whole dataset lives on the device as uint8; every batch is drawn and
augmented there (data.py), so no data loader and no CPU augmentation stand
between the GPU and its next step, and a step reads nothing back but the loss
every 50 steps (the progress bar's) and the evaluations. Stage 3 is
the same training with generated images joining the labeled set
(--pseudo-images samples.pt).

For the paper's ImageNet recipe (dpt.py's imagenet preset) the learner is not
trained but fit: a linear probe on frozen MSN features (imagenet.py).
"""

import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import plumbing
from plumbing import UserError

# -----------------------------------------------------------------------------
# Configuration: FixMatch's CIFAR-10 schedule by default (DPT's paper: --threshold freematch)


@dataclass
class FixMatchConfig:
    dataset: str = "cifar10"        # cifar10 | cifar100 | svhn | shapes | glyphs | a .pt/.npz file
    data_dir: str = "./data"        # where torchvision datasets are downloaded to
    labels: int = 4                 # labeled images per class
    seed: int = 0                   # seed of the labeled split and of training
    out: str = "runs/fixmatch"      # folder for ckpt.pt, classifier.pt and pseudo_labels.pt
    arch: str = "wrn28_2"           # wrn28_2 | small (a CPU-sized CNN)
    steps: int = 2 ** 20            # optimizer steps
    batch: int = 64                 # labeled images per step (all ranks together)
    uratio: int = 7                 # unlabeled images per labeled image
    lr: float = 0.03                # SGD learning rate, decayed as cos(lr_cosine pi k / K) over K steps
    lr_cosine: float = 7 / 16       # FixMatch's 7/16 ends at 0.2 lr; 1/2 ends at 0, so the weights settle
    momentum: float = 0.9           # Nesterov momentum
    weight_decay: float = 5e-4      # on convolution and linear weights, not on BN or biases
    ema: float = 0.999              # EMA of the weights, the model that is evaluated and saved
    precise_bn: int = 0             # training images the EMA model's BN statistics are measured on (0: copied)
    lambda_u: float = 1.0           # weight of the unlabeled loss
    threshold: str = "fixmatch"     # fixmatch (fixed tau) | freematch (self-adaptive)
    tau: float = 0.95               # FixMatch's confidence threshold
    freematch_ema: float = 0.999    # FreeMatch's EMA of the model's confidence
    freematch_start: float = 0.0    # FreeMatch's global threshold at step 0 (0: the paper's 1/C)
    fairness: float = 0.0           # weight of FreeMatch's self-adaptive fairness loss (0: none; TorchSSL 0.01)
    flip: bool = None               # mirror images in augmentation (unset: where a mirror keeps the class)
    pseudo_images: str = ""         # stage 3: a samples.pt whose images join the labeled set
    real_fraction: float = -1.0     # stage 3: share of real images in a labeled batch (-1: uniform over all)
    eval_every: int = 5000          # steps between test evaluations of the EMA model
    ckpt_every: int = 5000          # steps between checkpoints
    compile: bool = None            # torch.compile the network and its loss (unset: with CUDA only)
    cuda_graphs: bool = False       # with compile on one GPU: replay the step's forward and backward as CUDA graphs
    bf16: bool = None               # bf16 autocast (unset: with CUDA only)
    bench: bool = False             # print steps/s of WRN-28-2 at the paper's batch and exit


# A resumed run ends the same whatever these are.
FREE_TO_CHANGE = {"data_dir", "out", "eval_every", "ckpt_every", "compile", "cuda_graphs", "bench"}
# These change nothing without the unlabeled loss (lambda_u = 0): no unlabeled image is drawn.
UNLABELED_ONLY = {"uratio", "threshold", "tau", "freematch_ema", "freematch_start", "fairness"}


# -----------------------------------------------------------------------------
# Networks. Both take uint8 images and normalize them inside, so that a saved
# classifier carries its own preprocessing.


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float).view(1, -1, 1, 1))

    def forward(self, images):
        return (images.float() / 255 - self.mean) / self.std


def batch_norm(channels):
    return nn.BatchNorm2d(channels, momentum=0.001)  # FixMatch's slow running statistics


class WideBlock(nn.Module):
    """Pre-activation residual block of FixMatch's WRN (Zagoruyko & Komodakis
    2016; leaky ReLU 0.1). Where the width changes, the shortcut is a 1x1
    convolution, taken after the first BN+ReLU only in the network's first block."""

    def __init__(self, in_channels, out_channels, stride, activate_shortcut):
        super().__init__()
        self.same_shape = in_channels == out_channels
        self.activate_input = self.same_shape or activate_shortcut
        if self.activate_input:
            self.bn1 = batch_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = batch_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        if not self.same_shape:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)

    def forward(self, x):
        if self.activate_input:
            x = F.leaky_relu(self.bn1(x), 0.1)
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(x)), 0.1))
        return out + (x if self.same_shape else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-depth-widen; WRN-28-2 has 1.47M parameters for 10 classes."""

    def __init__(self, num_classes, mean, std, depth=28, widen=2):
        super().__init__()
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers = []
        for group in range(3):
            for i in range(blocks_per_group):
                layers.append(WideBlock(widths[group] if i == 0 else widths[group + 1], widths[group + 1],
                                        stride=(1 if group == 0 else 2) if i == 0 else 1,
                                        activate_shortcut=group == 0))
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(*layers)
        self.bn = batch_norm(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, images):
        """The penultimate features, which the last layer classifies (the oracle's judge of samples, dpt.py)."""
        return F.leaky_relu(self.bn(self.blocks(self.stem(self.normalize(images)))), 0.1).mean((2, 3))

    def forward(self, images):
        return self.fc(self.embed(images))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers, 16-32-64 channels: FixMatch on a laptop CPU."""

    def __init__(self, num_classes, mean, std, width=16):
        super().__init__()
        layers = []
        for i, (c_in, c_out) in enumerate([(3, width), (width, 2 * width), (2 * width, 4 * width)]):
            # BN's default momentum: short CPU runs cannot wait for FixMatch's 0.001 to settle.
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]
            layers += [nn.MaxPool2d(2)] if i < 2 else []
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * width, num_classes)

    def embed(self, images):
        return self.features(self.normalize(images)).mean((2, 3))

    def forward(self, images):
        return self.fc(self.embed(images))


ARCHITECTURES = {"wrn28_2": WideResNet, "small": SmallCNN}


def make_classifier(arch, num_classes, mean, std):
    return ARCHITECTURES[arch](num_classes, mean, std)


# -----------------------------------------------------------------------------
# The FixMatch loss (Sohn et al. 2020, eq. 2-4) and FreeMatch's threshold


class FreeMatchThreshold(nn.Module):
    """Self-adaptive thresholds (Wang et al. 2023, eq. 6-9): an EMA of the mean
    confidence sets the global threshold, an EMA of the mean class
    probabilities scales it per class, both starting at 1/C (the paper's eq. 6).
    start > 0 starts the global threshold there instead, as USB did until April
    2023: from 1/C a short run with one label per class learns the untrained
    network's guesses and never unlearns them (RESULTS.md, "A steadier stage 1").
    Buffers updated in place: they stay on the device, inside the compiled step,
    at fixed addresses that a CUDA graph can replay."""

    def __init__(self, num_classes, decay, start=0.0):
        super().__init__()
        self.decay = decay
        self.register_buffer("global_tau", torch.tensor(start or 1 / num_classes))
        self.register_buffer("class_p", torch.full((num_classes,), 1 / num_classes))
        self.register_buffer("label_hist", torch.full((num_classes,), 1 / num_classes))  # for fairness_loss

    def update(self, probs):
        confidence, predicted = probs.max(1)
        histogram = F.one_hot(predicted, probs.shape[1]).float().mean(0)
        mean_confidence, mean_probs = confidence.mean(), probs.mean(0)
        if dist.is_initialized():  # every rank sees the means over the whole batch
            stacked = torch.cat([mean_confidence.view(1), mean_probs, histogram])
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
            mean_confidence, mean_probs, histogram = stacked[0], *stacked[1:].chunk(2)
        self.global_tau.mul_(self.decay).add_((1 - self.decay) * mean_confidence)
        self.class_p.mul_(self.decay).add_((1 - self.decay) * mean_probs)
        self.label_hist.mul_(self.decay).add_((1 - self.decay) * histogram)

    def class_thresholds(self):
        return self.global_tau * self.class_p / self.class_p.max()


def fairness_loss(logits_strong, mask, freematch):
    """FreeMatch's self-adaptive fairness (Wang et al. 2023, eq. 11): minus the
    cross-entropy between the model's running class distribution (the EMA p~ over
    the EMA histogram of predicted classes h~) and the batch's (the mean of the
    strong views' probabilities over their histogram, on the images the mask
    keeps), each renormalized, as the authors' code (USB) computes it. Its aim is
    the entropy of the average prediction, with a running target for stability:
    that a few classes do not swallow the rest. Fixed shapes (weights, not boolean
    indexing), so that it compiles and replays as a CUDA graph."""
    probs = logits_strong.float().softmax(1)
    kept = mask.float()[:, None]
    count = kept.sum().clamp_min(1)
    mean_probs = (probs * kept).sum(0) / count
    histogram = (F.one_hot(probs.argmax(1), probs.shape[1]) * kept).sum(0) / count

    def sum_normalize(numerator, histogram):  # a class never predicted counts 0 (USB's inf -> 0)
        ratio = torch.where(histogram > 0, numerator / histogram.clamp_min(1e-12), 0.0)
        return ratio / ratio.sum().clamp_min(1e-12)
    model = sum_normalize(freematch.class_p, freematch.label_hist).detach()
    batch = sum_normalize(mean_probs, histogram.detach())
    return (model * torch.log(batch + 1e-12)).sum() * mask.any()


def fixmatch_loss(logits_labeled, labels, logits_weak, logits_strong, lambda_u, tau=None, freematch=None,
                  fairness=0.0):
    """Cross-entropy on the labeled batch + lambda_u * cross-entropy of the
    strong views against the weak views' hard pseudo labels, counted only where
    the weak view is confident: p >= tau, or p >= FreeMatch's class threshold;
    + fairness * FreeMatch's fairness_loss. Returns the loss, the mask and the
    pseudo labels."""
    supervised = F.cross_entropy(logits_labeled.float(), labels)
    if len(logits_weak) == 0:  # no unlabeled images: supervised training
        return supervised, torch.zeros(0, dtype=torch.bool, device=labels.device), labels[:0]
    probs = logits_weak.detach().float().softmax(1)
    confidence, pseudo = probs.max(1)
    if freematch is None:
        mask = confidence >= tau
    else:
        freematch.update(probs)
        mask = confidence >= freematch.class_thresholds()[pseudo]
    unsupervised = (F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * mask).mean()
    loss = supervised + lambda_u * unsupervised
    if fairness:
        loss = loss + fairness * fairness_loss(logits_strong, mask, freematch)
    return loss, mask, pseudo


# -----------------------------------------------------------------------------
# Evaluation, pseudo labels, saved classifiers


@torch.no_grad()
def predict(model, images, batch=1024):
    """Pseudo label (int64) and its confidence (float) for every image, no augmentation."""
    model.eval()
    device = next(model.parameters()).device
    labels, confidences = [], []
    for chunk in images.split(batch):
        probs = model(chunk.to(device)).float().softmax(1)
        confidence, label = probs.max(1)
        labels.append(label.cpu())
        confidences.append(confidence.cpu())
    return torch.cat(labels), torch.cat(confidences)


@torch.no_grad()
def embed(model, images, batch=1024):
    """The penultimate features [N, D] of every image, no augmentation."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.embed(chunk.to(device)).float().cpu() for chunk in images.split(batch)])


def accuracy(model, images, labels):
    return (predict(model, images)[0] == labels).float().mean().item()


def pseudo_labels(predicted, true_labels):
    """The artifact of stage 1 from a learner's (labels, confidences) of every
    training image (predict's, or the probe's probe_predict): both, and their
    accuracy against the true labels."""
    labels, confidence = predicted
    return {"labels": labels, "confidence": confidence, "accuracy": (labels == true_labels).float().mean().item()}


@torch.no_grad()
def precise_batch_norm(model, images, count, batch=512):
    """PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", sec. 3):
    the EMA model's BN statistics measured on `count` training images without
    augmentation. Copied from the trained model instead (FixMatch), they follow
    the last few batches of raw weights, strong views included, and the test
    accuracy of a short run swings by points between evaluations. The images are
    a fixed draw, so every rank computes the same statistics and no random
    stream moves."""
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:count]
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: every batch counts the same
    model.train()
    for chunk in images[pick.to(images.device)].split(batch):
        model(chunk.contiguous(memory_format=torch.channels_last))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


# -----------------------------------------------------------------------------
# Training


def is_real_fraction(value):
    return value == -1 or 0 <= value <= 1  # -1: uniform over all labeled images, generated ones included


RULES = {"dataset": data.KNOWN_DATASET, "data_dir": data.NOT_A_FILE, "labels": plumbing.at_least(1),
         "seed": plumbing.SEED, "out": data.NOT_A_FILE, "arch": plumbing.one_of(*ARCHITECTURES),
         "steps": plumbing.between(1, plumbing.MOST_STEPS),
         "batch": plumbing.between(1, plumbing.MOST_BATCH), "uratio": plumbing.between(1, 1024),
         "lr": plumbing.POSITIVE,
         "lr_cosine": plumbing.between(0, 0.5, "between 0 and 0.5"), "momentum": plumbing.FRACTION,
         "weight_decay": plumbing.at_least(0), "ema": plumbing.FRACTION,
         "precise_bn": plumbing.between(0, plumbing.MOST_IMAGES), "lambda_u": plumbing.at_least(0),
         "threshold": plumbing.one_of("fixmatch", "freematch"), "tau": plumbing.PROBABILITY,
         "freematch_ema": plumbing.FRACTION,
         "freematch_start": plumbing.PROBABILITY, "fairness": plumbing.at_least(0),
         "real_fraction": (is_real_fraction, "-1 (uniform) or between 0 and 1"),
         "eval_every": plumbing.between(1, plumbing.MOST_STEPS), "ckpt_every": plumbing.between(1, plumbing.MOST_STEPS)}


def check(config, world=1, flags=None):
    """Refuse a setting that cannot train, in one line, before any work. flags:
    the name of each field's flag where it differs (dpt.py's --ssl-steps)."""
    plumbing.check_fields(config, RULES, flags)
    plumbing.check_divisible(config, world, flags)
    plumbing.check_cuda_graphs(config, world, flags)
    if config.fairness and config.threshold != "freematch":
        raise UserError(f"{plumbing.flag('fairness', flags)} {config.fairness}: FreeMatch's fairness loss needs its "
                        f"thresholds; add {plumbing.flag('threshold', flags)} freematch or set it to 0")


def make_optimizer(model, config):
    """SGD with Nesterov momentum, weight decay on convolution and linear weights
    only: BN's scales and shifts and every bias are not pulled towards 0 (FixMatch).
    Fused: one kernel for all the weights instead of a few per tensor."""
    decay, no_decay = [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=config.lr, momentum=config.momentum, nesterov=True, fused=True)


def train(config, dataset, labeled_index, generated=None, progress=True):
    """FixMatch from scratch (or from config.out/ckpt.pt) to config.steps.
    generated: optional (uint8 images, int64 labels) that join the labeled set (stage 3).
    Returns the EMA model and a dict of metrics; rank 0 writes the checkpoint."""
    rank, world, device = plumbing.distributed_setup()
    check(config, world)
    torch.manual_seed(config.seed)  # the same initial weights on every rank

    train_x = dataset.train_x.to(device)
    labeled_x, labeled_y = train_x[labeled_index.to(device)], dataset.train_y[labeled_index].to(device)
    real_count = len(labeled_x)
    if generated is not None:
        labeled_x = torch.cat([labeled_x, generated[0].to(device)])
        labeled_y = torch.cat([labeled_y, generated[1].to(device)])
    unlabeled_y = dataset.train_y.to(device)

    mean = dataset.train_x[:10000].float().mean((0, 2, 3)) / 255
    std = dataset.train_x[:10000].float().std((0, 2, 3)) / 255
    model = make_classifier(config.arch, dataset.num_classes, mean, std).to(device, memory_format=torch.channels_last)
    ema_model = (make_classifier(config.arch, dataset.num_classes, mean, std)
                 .to(device, memory_format=torch.channels_last))
    ema_model.load_state_dict(model.state_dict())
    ema_model.requires_grad_(False)
    optimizer = make_optimizer(model, config)
    freematch = (FreeMatchThreshold(dataset.num_classes, config.freematch_ema, config.freematch_start).to(device)
                 if config.threshold == "freematch" else None)
    torch.manual_seed(config.seed + 1 + rank)  # but every rank draws its own batches

    step, metrics = 0, {"best_accuracy": 0.0, "history": []}
    checkpoint_path = os.path.join(config.out, "ckpt.pt")
    checkpoint = plumbing.resume(checkpoint_path, config, FREE_TO_CHANGE, world, rank, model, ema_model, optimizer)
    if checkpoint is not None:
        step, metrics = checkpoint["step"], checkpoint["metrics"]
        if rank == 0 and progress:
            print(f"resuming {checkpoint_path} at step {step:,} of {config.steps:,}", file=sys.stderr)
        if freematch is not None:  # checkpoints from before the fairness loss have no histogram: its start
            freematch.load_state_dict({"label_hist": freematch.label_hist, **checkpoint["freematch"]})

    compile = plumbing.on_cuda_unless_set(config.compile, device)
    _, step_loss = plumbing.for_training(model, fixmatch_step_loss, world, device, compile, config.cuda_graphs)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=plumbing.on_cuda_unless_set(config.bf16, device))

    per_rank = config.batch // world
    flip = dataset.flips if config.flip is None else config.flip
    # Without the unlabeled loss (the labeled-only baseline, dpt.py's oracle) no unlabeled image is drawn.
    unlabeled_per_rank = per_rank * config.uratio if config.lambda_u else 0
    # Compiled, the augmentation's ~500 small ops (RandAugment's) are a few fused kernels, where the
    # host would launch each; only where RandAugment draws nothing on the host (data.randaugment_step).
    augment = (torch.compile(augmented_batch, fullgraph=True, dynamic=False)
               if compile and unlabeled_per_rank and unlabeled_per_rank % len(data.RANDAUGMENT) == 0
               else augmented_batch)
    from tqdm import tqdm
    bar = tqdm(total=config.steps, initial=step, desc="fixmatch", disable=not progress or rank > 0, unit="step")
    model.train()
    first_step, clock, started = step, plumbing.StepClock(device), time.perf_counter()
    while step < config.steps:  # nothing in a step reads the device: the host queues steps ahead of the GPU
        timed = step >= first_step + 5  # speed is timed after warm-up and compilation
        if timed:
            clock.begin()
            if step == first_step + 5:
                metrics["warmup_seconds"] = clock.started - started  # compilation happens in the first step
        for group in optimizer.param_groups:  # FixMatch's cosine decay, eq. in Sohn et al. 2020, sec. 3
            group["lr"] = config.lr * math.cos(config.lr_cosine * math.pi * step / config.steps)
        labeled_pick = sample_labeled(per_rank, real_count, len(labeled_x), config.real_fraction, device)
        unlabeled_pick = torch.randint(len(train_x), (unlabeled_per_rank,), device=device)
        inputs = augment(labeled_x[labeled_pick], train_x[unlabeled_pick], flip)
        with autocast:
            loss, mask, pseudo_y = step_loss(inputs, labeled_y[labeled_pick], unlabeled_per_rank, config.lambda_u,
                                             config.tau, freematch, config.fairness)
        update_weights(loss, model, ema_model, optimizer, config.ema)
        step += 1
        if timed:  # the step alone, not the evaluation and checkpoint after it
            clock.end(last=step == config.steps)
            if step == config.steps:
                metrics["steps_per_second"] = clock.per_second()

        if (step % 50 == 0 or step == config.steps) and unlabeled_per_rank:
            correct = ((pseudo_y == unlabeled_y[unlabeled_pick]) & mask).sum() / mask.sum().clamp_min(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", mask=f"{mask.float().mean().item():.2f}",
                            pseudo_acc=f"{correct.item():.2f}")
        if (step % config.eval_every == 0 or step == config.steps) and dataset.test_x is not None:
            if config.precise_bn:
                precise_batch_norm(ema_model, train_x, config.precise_bn)
            test_accuracy = accuracy(ema_model, dataset.test_x, dataset.test_y)
            metrics["accuracy"] = test_accuracy
            metrics["best_accuracy"] = max(metrics["best_accuracy"], test_accuracy)
            metrics["history"].append((step, test_accuracy))
            if rank == 0:
                bar.write(f"step {step}: test accuracy of the EMA model {100 * test_accuracy:.2f}% "
                          f"(best so far {100 * metrics['best_accuracy']:.2f}%, selected on the test set)")
            model.train()
        if step % config.ckpt_every == 0 or step == config.steps:
            rngs = plumbing.all_rng_states(world)
            if rank == 0:
                plumbing.save_atomic({"model": model.state_dict(), "ema": ema_model.state_dict(),
                                      "optimizer": optimizer.state_dict(), "step": step, "metrics": metrics,
                                      "freematch": freematch.state_dict() if freematch else None,
                                      "rng": rngs, "config": asdict(config)}, checkpoint_path)
        bar.update(1)
    bar.close()
    if config.precise_bn:  # the saved model's statistics, with or without a test set
        precise_batch_norm(ema_model, train_x, config.precise_bn)
    return ema_model, metrics


def augmented_batch(labeled, unlabeled, flip=True):
    """One step's network input, uint8 on the device: the labeled images weakly
    augmented, then the unlabeled ones weakly and strongly."""
    views = [data.weak_augment(labeled, flip=flip), data.weak_augment(unlabeled, flip=flip),
             data.strong_augment(unlabeled, flip=flip)]
    return torch.cat(views).contiguous(memory_format=torch.channels_last)


def fixmatch_step_loss(forward, inputs, labeled_y, unlabeled_count, lambda_u, tau, freematch, fairness):
    """fixmatch_loss of an augmented_batch, through the network in one pass, so
    that BN sees labeled and unlabeled images together; plumbing.for_training
    compiles it with the network as one graph."""
    logits = forward(inputs)
    logits_labeled, logits_weak, logits_strong = logits.split([len(labeled_y), unlabeled_count, unlabeled_count])
    return fixmatch_loss(logits_labeled, labeled_y, logits_weak, logits_strong, lambda_u, tau, freematch, fairness)


def update_weights(loss, model, ema_model, optimizer, ema):
    """Backward, SGD, and the EMA of the weights (one kernel per list); BN
    statistics are copied (and measured before evaluation)."""
    plumbing.zero_grad(optimizer)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - ema)
        torch._foreach_copy_(list(ema_model.buffers()), list(model.buffers()))


def sample_labeled(count, real_count, total, real_fraction, device):
    """Indices into the labeled set (real images first, then generated images):
    uniform over all of it, or a fixed share from the real ones."""
    if real_fraction < 0 or total == real_count:
        return torch.randint(total, (count,), device=device)
    real = round(count * real_fraction)
    return torch.cat([torch.randint(real_count, (real,), device=device),
                      torch.randint(real_count, total, (count - real,), device=device)])


def save_classifier(model, config, metrics, path):
    """classifier.pt: the EMA weights (normalization included), config and metrics."""
    plumbing.save_atomic({"model": model.state_dict(), "config": asdict(config), "metrics": metrics}, path)


def load_classifier(path, device="cpu"):
    """(model in eval mode, metrics) from a classifier.pt."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        weights = saved["model"]
        model = make_classifier(saved["config"]["arch"], len(weights["fc.bias"]), torch.zeros(3), torch.ones(3))
        model.load_state_dict(weights)  # the normalization's mean and std come with the weights
    except Exception as error:
        raise UserError(f"classifier {path} is unreadable ({type(error).__name__}); delete it to train "
                        "it again") from None
    return model.to(device).eval(), saved["metrics"]


# -----------------------------------------------------------------------------
# Command line: stage 1 alone, and the benchmark


def training_rate(config, steps=35):
    """(steps/s, seconds of the 5 warm-up steps, compilation included) of config's
    network and batch on random images, augmentation included (in a temporary folder)."""
    fake = data.Dataset("random", torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8),
                        torch.randint(0, 10, (50_000,)), None, None, 10)
    with tempfile.TemporaryDirectory() as out:
        run = replace(config, out=out, steps=steps, eval_every=steps, ckpt_every=steps)
        metrics = train(run, fake, torch.arange(640), progress=False)[1]
    return metrics["steps_per_second"], metrics["warmup_seconds"]


def benchmark(config):
    """Steps/s at --batch + 2 x --batch * --uratio (64 + 2 x 448 by default)."""
    _, _, device = plumbing.distributed_setup()
    rate, warmup = training_rate(config)
    where = plumbing.device_name(device)
    print(f"{config.arch}, batch {config.batch} + 2 x {config.batch * config.uratio}: "
          f"{rate:.2f} steps/s after {warmup:.1f} s of warm-up ({where}, "
          f"compile={plumbing.on_cuda_unless_set(config.compile, device)}, "
          f"bf16={plumbing.on_cuda_unless_set(config.bf16, device)})")


def load_generated(path, dataset):
    """Stage 3's extra labeled images: a samples.pt of uint8 images and int64 labels
    that fit the dataset."""
    try:
        samples = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = samples["images"], samples["labels"]
    except Exception as error:
        raise UserError(f"cannot read generated images from {path} ({type(error).__name__}); "
                        "expected a samples.pt with 'images' and 'labels'") from None
    if images.dtype != torch.uint8 or images.shape[1:] != dataset.train_x.shape[1:] or len(images) != len(labels):
        raise UserError(f"{path}: images {tuple(images.shape)} {images.dtype} do not fit {dataset.name}'s "
                        f"{tuple(dataset.train_x.shape[1:])} uint8 images, or do not match {len(labels)} labels")
    if labels.dtype != torch.int64 or len(labels) and (labels.min() < 0 or labels.max() >= dataset.num_classes):
        raise UserError(f"{path}: labels must be int64 in 0..{dataset.num_classes - 1}")
    return images, labels


def main():
    config = plumbing.parse_config(FixMatchConfig, __doc__)
    if config.bench:
        return benchmark(config)
    rank, world, _ = plumbing.distributed_setup()
    check(config, world)
    dataset = data.load_dataset(config.dataset, config.data_dir)
    labeled_index = data.labeled_split(dataset.train_y, config.labels, config.seed)
    generated = load_generated(config.pseudo_images, dataset) if config.pseudo_images else None
    plumbing.claim_folder(config.out, rank, world)  # after the input is read: bad input writes nothing
    model, metrics = train(config, dataset, labeled_index, generated)
    if rank == 0:
        save_classifier(model, config, metrics, os.path.join(config.out, "classifier.pt"))
        labels = pseudo_labels(predict(model, dataset.train_x), dataset.train_y)
        plumbing.save_atomic(labels, os.path.join(config.out, "pseudo_labels.pt"))
        print(f"pseudo labels of {len(labels['labels'])} training images: {100 * labels['accuracy']:.2f}% correct; "
              f"test accuracy {100 * metrics.get('accuracy', float('nan')):.2f}%")


if __name__ == "__main__":
    plumbing.run_main(main)

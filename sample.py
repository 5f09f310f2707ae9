"""Sampling. Stage 2 of DPT, second half: K images per class from the
class-conditional EDM diffusion model that unet.py trained on pseudo labels,
with EDM's Heun sampler (Karras et al. 2022), Euler, or DPM-Solver++(2M) (Lu et
al. 2022), and classifier-free guidance (Ho & Salimans 2022).

    python sample.py runs/cifar10-1l-s0/stage2/diffusion.pt --per-class 1000 --out runs/cifar10-1l-s0
    python sample.py CKPT --per-class 1000 --solver dpmpp --steps 15 --guidance 1.4
    torchrun --nproc_per_node 8 sample.py CKPT --per-class 1000    # every GPU samples a share
    python sample.py CKPT --bench                                   # images/s of 35-evaluation Heun

Writes OUT/samples.pt = {"images": uint8 [K*C, 3, H, W], "labels": int64 [K*C],
"config"}, class by class, and OUT/samples.png with one row per class. Image i
starts from its own noise seeded by (seed, i): the same seed gives every image
the same noise for any batch size and any number of processes.
"""

import math
import os
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch

import data
import plumbing
import unet
from plumbing import UserError

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class SampleConfig:
    checkpoint: str                 # stage 2's diffusion.pt (or ckpt.pt), written by unet.py
    per_class: int = 1000           # K, images generated for every class
    solver: str = "heun"            # heun (EDM's 2nd order) | euler | dpmpp (DPM-Solver++(2M))
    steps: int = 18                 # N noise levels from 80 to 0.002, then 0; evaluations: heun 2N-1, euler and dpmpp N
    guidance: float = 1.0           # w in D = D_uncond + w (D_cond - D_uncond): 1 is none, 0 unconditional
    seed: int = 0                   # image i starts from noise seeded by (seed, i)
    batch: int = 512                # images per network evaluation on each process (doubled when guidance is not 1)
    out: str = "runs/samples"       # folder for samples.pt and samples.png
    bf16: bool = None               # bf16 autocast of the network (unset: with CUDA only); the ODE state stays float64
    bench: bool = False             # print images/s of Heun with 18 steps (35 evaluations) at --batch and exit


# -----------------------------------------------------------------------------
# Noise levels and samplers of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma,
# EDM's choice s(t) = 1, sigma(t) = t (Karras et al. 2022, eq. 4 and Table 1). The slope
# comes from the score identity grad log p(x; sigma) = (D(x; sigma) - x) / sigma^2 (EDM eq. 3)
# put into dx/dsigma = -sigma grad log p(x; sigma) (eq. 1 with sigma(t) = t).
# A sampler takes the denoiser D(x, sigma, labels), x = sigma_0 * noise, the
# labels and the noise levels as a list of floats (host numbers: no device
# syncs), and returns x at sigma_N = 0. The ODE state is float64, as in EDM's
# sampler, whatever precision the network runs in.


def noise_levels(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """sigma_0 = 80 > ... > sigma_{N-1} = 0.002, then sigma_N = 0 (Karras et al. 2022, eq. 5):
    equal steps in sigma^(1/rho); rho = 7 makes them short near sigma_min, where
    EDM found the errors matter most, and long near sigma_max."""
    i = torch.arange(steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def heun(denoise, x, labels, sigmas):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): an Euler
    step, then the trapezoidal correction with the slope at its end, except on
    the last step to sigma = 0 where the slope is undefined; 2N - 1 evaluations."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d_i = (x - denoise(x, sigma, labels)) / sigma  # Algorithm 1, line 5
        x_next = x + (sigma_next - sigma) * d_i
        if sigma_next > 0:
            d_prime_i = (x_next - denoise(x_next, sigma_next, labels)) / sigma_next  # line 7
            x_next = x + (sigma_next - sigma) * (d_i + d_prime_i) / 2  # line 8
        x = x_next
    return x


def euler(denoise, x, labels, sigmas):
    """First-order steps of the same ODE; N evaluations, the last step lands on D(x; sigma_min)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * (x - denoise(x, sigma, labels)) / sigma
    return x


def dpmpp(denoise, x, labels, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with alpha = 1, lambda = -log sigma:
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} + (1 - sigma_i / sigma_{i-1}) D_i,
        D_i = (1 + 1/(2 r)) D(x_{i-1}) - 1/(2 r) D(x_{i-2}),  r = h_{i-1} / h_i,  h_i = lambda_i - lambda_{i-1},
    the exact solution of the ODE's linear part with the data prediction
    extrapolated linearly in lambda. The first step has no previous D and the
    last (h = infinity, r = 0) no usable extrapolation: both are first order,
    the last returns D(x; sigma_min). N evaluations."""
    previous = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoise(x, sigma, labels)
        prediction = denoised
        if previous is not None and sigma_next > 0:
            r = math.log(sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)
            prediction = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * previous
        x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * prediction
        previous = denoised
    return x


SOLVERS = {"heun": heun, "euler": euler, "dpmpp": dpmpp}


RULES = {"per_class": plumbing.between(1, plumbing.MOST_IMAGES), "solver": plumbing.one_of(*SOLVERS),
         "steps": plumbing.between(2, 1000, "from 2 (the noise levels sigma_max and sigma_min) to 1,000"),
         "guidance": plumbing.at_least(0, "at least 0 (1 is no guidance, 0 unconditional)"),
         "seed": plumbing.SEED, "batch": plumbing.between(1, plumbing.MOST_BATCH), "out": data.NOT_A_FILE}


def check(config, flags=None):
    """Refuse a setting that cannot sample, in one line, before the model is loaded."""
    plumbing.check_fields(config, RULES, flags)


# -----------------------------------------------------------------------------
# Classifier-free guidance and generation


def guided(model, guidance):
    """D(x; sigma, c) of unet.EDMPrecond in float64, guided (Ho & Salimans 2022):
    D = D(x; sigma, null) + w (D(x; sigma, c) - D(x; sigma, null)), the conditional
    and the null-label halves in one forward of twice the batch. w = 1 is the
    conditional model alone and skips the null half; papers that write
    (1 + s) D_cond - s D_uncond have s = w - 1."""
    def denoise(x, sigma, labels):
        x, sigma = x.float(), torch.full((len(x),), sigma, device=x.device)
        if guidance == 1:
            return model(x, sigma, labels).double()
        null = torch.full_like(labels, model.num_classes)
        conditional, unconditional = model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                           torch.cat([labels, null])).double().chunk(2)
        return unconditional + guidance * (conditional - unconditional)
    return denoise


def initial_noise(seed, index, shape):
    """Unit Gaussian noise of each image from its own generator seeded by
    (seed, i): numpy's PCG64 keeps all of that seed, where torch's CPU
    generator keeps only 32 bits of its seed (so seed * 2^32 + i would repeat)."""
    return torch.stack([torch.from_numpy(np.random.default_rng([seed, i]).standard_normal(shape)) for i in index])


@torch.no_grad()
def generate(model, per_class, solver="heun", steps=18, guidance=1.0, seed=0, batch=512, device="cpu",
             rank=0, world=1, bf16=None, progress=True, decode=None, gather=True):
    """per_class images of every class, class by class: (uint8 [K*C, 3, H, W], int64 [K*C]).
    Process `rank` of `world` samples images i = rank (mod world) and every
    process returns all of them (all_gather), or with gather=False its own. A
    latent model's samples pass through decode (latents -> images in [-1, 1]: the
    imagenet preset's autoencoder)."""
    device = torch.device(device)
    solve = SOLVERS[solver]
    denoise = guided(model, guidance)
    sigmas = noise_levels(steps).tolist()
    shape = (model.channels, model.resolution, model.resolution)
    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    mine = torch.arange(rank, len(labels), world)
    decode = decode or torch.nn.Identity()
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=plumbing.on_cuda_unless_set(bf16, device))
    with autocast:
        image_shape = decode(torch.zeros((1, *shape), device=device)).shape[1:]  # the decoder's output side
    images = torch.empty((len(mine), *image_shape), dtype=torch.uint8, device=device)
    from tqdm import tqdm
    bar = tqdm(total=len(mine), desc=f"{solver} {steps} steps", unit="img", disable=not progress or rank > 0)
    for start in range(0, len(mine), batch):
        index = mine[start:start + batch]
        x = sigmas[0] * initial_noise(seed, index.tolist(), shape).to(device)
        with autocast:
            x = decode(solve(denoise, x, labels[index].to(device), sigmas))
        # as EDM's generate.py, in float32: in bf16 (8 bits of mantissa) x * 127.5 + 128
        # would round to a whole number first and land one level high about half the time
        images[start:start + len(index)] = (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        bar.update(len(index))
    bar.close()
    if world > 1 and gather:
        images = plumbing.gather_shares(images, len(labels), world)
    return images.cpu(), labels


def sample_images(config, model, device, rank=0, world=1, decode=None, gather=True):
    """generate() with a SampleConfig's settings: this script's samples, and dpt.py's."""
    return generate(model, config.per_class, config.solver, config.steps, config.guidance, config.seed, config.batch,
                    device, rank, world, config.bf16, decode=decode, gather=gather)


# -----------------------------------------------------------------------------
# Grids of samples


def save_grid(images, labels, path, columns=16):
    """A PNG with one row per class of its first `columns` images (data.save_image_rows)."""
    rows = [images[labels == c][:columns] for c in labels.unique()]
    width = max(len(row) for row in rows)
    blank = torch.full((1, *images.shape[1:]), 255, dtype=torch.uint8)  # fills the rows of classes with fewer images
    data.save_image_rows([torch.cat([row, blank.expand(width - len(row), -1, -1, -1)]) for row in rows], path)


def preview_grid(model, path, per_class=8, steps=18):
    """unet.py's view of training: Heun, seed 0, so successive grids show the
    same noise turned into images by successive weights. The model is sampled
    in eval mode and left in the mode it came in."""
    training = model.training
    model.eval()
    images, labels = generate(model, per_class, "heun", steps, device=next(model.parameters()).device, progress=False)
    model.train(training)
    save_grid(images, labels, path)


# -----------------------------------------------------------------------------
# Command line: sampling and the benchmark


def heun_rate(model, per_class, device, guidance=1.0, bf16=None, steps=18, batch=512):
    """Images/s of Heun with 35 network evaluations (18 steps): the best of 3
    runs after a warm-up batch of 2 steps; with fewer steps, the time is scaled
    to 35 evaluations (each costs the same)."""
    heun = partial(generate, model, per_class, "heun", guidance=guidance, batch=batch, device=device, bf16=bf16,
                   progress=False)
    heun(2)
    return plumbing.rate(partial(heun, steps), per_class * model.num_classes, device, repeats=3) * (2 * steps - 1) / 35


def benchmark(model, config, device):
    """Images/s of Heun with 18 steps (35 evaluations) on one batch of about --batch images."""
    per_class = max(1, config.batch // model.num_classes)
    rate = heun_rate(model, per_class, device, config.guidance, config.bf16, batch=config.batch)
    where = plumbing.device_name(device)
    print(f"heun, 35 evaluations, batch {per_class * model.num_classes}, guidance {config.guidance}: "
          f"{rate:.1f} images/s ({where}, bf16={plumbing.on_cuda_unless_set(config.bf16, device)})")


def main():
    config = plumbing.parse_config(SampleConfig, __doc__)
    check(config)
    rank, world, device = plumbing.distributed_setup()
    model = unet.load_diffusion(config.checkpoint, device)
    if config.guidance != 1 and not model.label_dropout:
        raise UserError(f"--guidance {config.guidance}: {config.checkpoint} was trained without label dropout, "
                        "so its null class never learned anything to guide with; give --guidance 1, or "
                        "train with --label-dropout 0.1")
    if config.bench:
        return benchmark(model, config, device)
    plumbing.claim_folder(config.out, rank, world)  # after the input is read: bad input writes nothing
    images, labels = sample_images(config, model, device, rank, world)
    if rank == 0:
        plumbing.save_atomic({"images": images, "labels": labels, "config": asdict(config)},
                             os.path.join(config.out, "samples.pt"))
        save_grid(images, labels, os.path.join(config.out, "samples.png"))
        evaluations = 2 * config.steps - 1 if config.solver == "heun" else config.steps
        print(f"saved {len(images)} images ({config.per_class} per class, {evaluations} network evaluations each) "
              f"to {os.path.join(config.out, 'samples.pt')} and samples.png")


if __name__ == "__main__":
    plumbing.run_main(main)

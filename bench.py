"""The speed of every stage on this device, beside the same code eager in fp32,
and what the presets would take here (dpt.py's --bench):

    python dpt.py --bench                     # the pixel stages, and the fast and cifar presets' hours
    python dpt.py --bench --preset imagenet   # the imagenet preset's encoding, U-ViT, sampling and hours

Each row times the work it names and nothing else (training rows: their steps,
never the checkpoint after them); measured figures are in RESULTS.md.
"""

from functools import partial

import torch

import data
import fid
import fixmatch
import imagenet
import plumbing
import sample
import unet

# -----------------------------------------------------------------------------
# The pixel stages (CIFAR's presets) and the imagenet preset's, one row a stage

# FixMatch's CIFAR-10 step (Sohn et al. 2020): 64 labeled images and 7 x 64 unlabeled ones, each seen twice.
PAPER_STEP_IMAGES = 64 * (1 + 2 * 7)
# ImageNet-1k's 1,281,167 training and 50,000 validation images, all of which the imagenet preset encodes.
IMAGENET_IMAGES = 1_281_167 + 50_000


def weak_then_strong(images):
    """FixMatch's strong view: RandAugment and Cutout on the weak view's flip and crop."""
    return data.strong_augment(data.weak_augment(images))


def bench(config, device, arch, size, presets):
    """One row per stage with this run's settings (compile, bf16 and CUDA graphs as
    the preset or the flags set them) beside the same code eager in fp32, as the
    official code runs (TorchSSL and EDM); then the fast and cifar presets'
    projected wall time from the measured rates (presets: their resolved
    settings, by name). A CPU runs small batches and
    few steps (each row's size is printed); rates are per image, so they project.
    The networks are the paper's (WRN-28-2, the cifar size) unless --ssl-arch
    and --diffusion-size ask for others. Each training row times its steps only,
    after 5 of warm-up (compilation), never its checkpoint. On one H100 the rows
    should take (not yet measured on a GPU): augmentation 5 s; FixMatch 30 timed
    steps, about 60 s with its compilation and eager run; U-Net 20 steps of 512, about
    100 s; Heun 10 s; FID 5 s: under 3 minutes."""
    on_cuda = device.type == "cuda"
    # On a GPU the cifar preset's real steps (64 + 2 x 448 images; EDM's 512 in micro-batches of 256), whose
    # peak memory is the run's; a CPU runs small batches and few steps.
    # Timed steps after the 5 of warm-up: on a CPU each is timed and the fastest counts (plumbing.StepClock).
    ssl_batch, diffusion_batch, micro_batch = (64, 512, 256) if on_cuda else (4, 2, 0)
    ssl_steps, diffusion_steps = (30, 20) if on_cuda else (10, 20)
    sampler = unet.make_diffusion("unet", size, 10, 32).to(device).eval()
    inception = fid.for_inference(fid.FIDInception(), device)
    graphs = config.cuda_graphs  # on the optimized rows only: the eager ones cannot replay

    # One function a row: its rate with the options that apply to it (bench_rows) on or off.
    def augmentation():
        return data.augmentation_rate(weak_then_strong, 65536 if on_cuda else 1024, device.type)

    def classifier_training(compile, bf16):
        return fixmatch.training_rate(fixmatch.FixMatchConfig(arch=arch, batch=ssl_batch, uratio=7, compile=compile,
                                                              cuda_graphs=graphs and compile, bf16=bf16),
                                      steps=ssl_steps + 5)

    def diffusion_training(compile, bf16):
        return unet.training_rate(unet.DiffusionConfig(arch="unet", size=size, batch=diffusion_batch,
                                                       micro_batch=micro_batch, compile=compile,
                                                       cuda_graphs=graphs and compile, bf16=bf16),
                                  steps=diffusion_steps + 5)

    def heun_sampling(bf16):  # on a GPU 1,000 images in one batch, the sampling stage's batch
        return sample.heun_rate(sampler, 100 if on_cuda else 1, device, bf16=bf16, steps=18 if on_cuda else 2,
                                batch=1000)

    def fid_features():
        images = torch.randint(0, 256, (100 if on_cuda else 8, 3, 32, 32), dtype=torch.uint8, device=device)
        with torch.inference_mode(), fid.full_fp32():
            return plumbing.rate(partial(inception, images), len(images), device)

    # FLOPs of one unit of each row's rate: a training image costs 3x its forward (a backward of twice),
    # a sampled image 35 forward evaluations, a classifier step its images'.
    per_step = ssl_batch * (1 + 2 * 7)  # images through the classifier in a step
    classifier = fixmatch.make_classifier(arch, 10, torch.zeros(3), torch.ones(3)).eval()
    step_flops = 3 * per_step * plumbing.forward_flops(classifier, torch.zeros(1, 3, 32, 32))
    unet_flops = unet.flops_per_image(unet.make_diffusion("unet", size, 10, 32))
    inception_flops = plumbing.forward_flops(fid.FIDInception().eval(), torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    replayed = " as CUDA graphs" * bool(graphs)
    # (row, its rate, unit, the options that apply to it, FLOPs a unit)
    both = ("compile", "bf16")
    rows = [("augmentation, weak + strong", augmentation, "images/s", (), None),
            (f"FixMatch {arch}, {ssl_batch} + 2 x {7 * ssl_batch}{replayed}", classifier_training, "steps/s", both,
             step_flops),
            (f"U-Net {size} training, batch {diffusion_batch}{replayed}", diffusion_training, "images/s", both,
             3 * unet_flops),
            (f"Heun, 35 evaluations, U-Net {size}", heun_sampling, "images/s", ("bf16",), 35 * unet_flops),
            ("FID features (always eager fp32)", fid_features, "images/s", (), inception_flops)]
    rate = dict(zip(("augment", "classifier", "unet", "heun", "fid"), bench_rows(config, device, rows)))

    # Projection: every stage's work at its measured rate; a preset's U-Net of
    # another size than the one measured is scaled by forward FLOPs.
    if arch != "wrn28_2":
        return print("the presets' projected time needs the classifier they train: leave out --ssl-arch")
    paper_steps_per_second = rate["classifier"] * per_step / PAPER_STEP_IMAGES
    for preset, settings in presets.items():
        network = unet.make_diffusion(settings.diffusion_arch, settings.diffusion_size, 10, 32)
        scale = unet_flops / unet.flops_per_image(network)
        evaluations = 2 * settings.sample_steps - 1
        seconds = {"stages 1 and 3": (settings.ssl_steps + settings.stage3_steps) / paper_steps_per_second,
                   "stage 2": settings.diffusion_images / (rate["unet"] * scale),
                   "sampling": settings.sample_per_class * 10 * evaluations / 35 / (rate["heun"] * scale),
                   "FID": 60_000 / rate["fid"]}
        print(f"{preset} preset here: {sum(seconds.values()) / 3600:,.1f} h (" +
              ", ".join(f"{stage} {time / 3600:,.1f} h" for stage, time in seconds.items()) + ")")


def bench_rows(config, device, rows):
    """Print each row's rate with this run's compile and bf16 (as dpt.resolve filled
    them), where they apply to the row, beside eager fp32, the seconds its training
    steps took to warm up (compilation included; '-' where nothing compiles), the
    share of the GPU's bf16 peak its FLOPs reach, and its peak device memory; return
    the rates."""
    on_cuda, optimized = device.type == "cuda", {"compile": config.compile, "bf16": config.bf16}

    def measure(row_rate, options):
        """(rate, warm-up seconds or None, peak device memory in GiB or None) of row_rate(**options)."""
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        measured = row_rate(**options)
        rate, warmup = measured if isinstance(measured, tuple) else (measured, None)  # training rows time warm-up
        return rate, warmup, torch.cuda.max_memory_allocated() / 2 ** 30 if on_cuda else None
    print(f"{plumbing.device_name(device)}: compile={config.compile}, bf16={config.bf16}, beside eager fp32")
    print(f"  {'stage':<40} {'rate':>10} {'eager fp32':>10} {'ratio':>6}  {'unit':<9} {'warm-up':>8} "
          f"{'of peak':>8}  peak memory")
    measured = []
    for name, row_rate, unit, applies, flops in rows:
        options = {option: optimized[option] for option in applies}
        rate, warmup, memory = measure(row_rate, options)
        baseline = measure(row_rate, dict.fromkeys(applies, False))[0] if any(options.values()) else rate
        share = flops and plumbing.peak_share(rate * flops, device)
        measured.append(rate)
        print(f"  {name:<40} {rate:>10,.1f} {baseline:>10,.1f} {rate / baseline:>5.2f}x  {unit:<9} "
              f"{'-' if warmup is None else f'{warmup:.1f} s':>8} {'-' if share is None else f'{100 * share:.1f}%':>8}"
              f"  {'-' if memory is None else f'{memory:.1f} GiB'}", flush=True)
    return measured


def bench_latent(config, device):
    """The imagenet preset's rows, with its networks (random weights: speed needs
    no checkpoint): encoding (MSN and the autoencoder, an image and its mirror),
    U-ViT training on latents (on a GPU the preset's real step: its batch in its
    micro-batches, the large U-ViT checkpointed, so its peak memory is the run's),
    guided denoising and decoding, then the preset's projected wall time on this
    device. A CPU runs a batch of 2 and 2 solver steps."""
    on_cuda = device.type == "cuda"
    batch = 64 if on_cuda else 2
    side, latent = config.image_size, config.image_size // 8
    autoencoder = imagenet.AutoencoderKL(**imagenet.AUTOENCODER_SIZES[config.autoencoder_size]).to(device).eval()
    msn = imagenet.MSNViT(imagenet.msn_crop(side), **imagenet.MSN_SIZES[config.msn_size]).to(device).eval()
    autoencoder.requires_grad_(False)
    msn.requires_grad_(False)
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
    latents = 0.5 * torch.randn(4096 if on_cuda else 64, imagenet.LATENT_CHANNELS, latent, latent).half()
    step = dict(batch=config.diffusion_batch, micro_batch=config.diffusion_micro_batch) if on_cuda else dict(batch=2)

    model = unet.make_diffusion("uvit", config.diffusion_size, 1000, latent, imagenet.LATENT_CHANNELS).to(device).eval()
    model.requires_grad_(False)
    denoise = sample.guided(model, config.sample_guidance)
    x = torch.randn(batch, imagenet.LATENT_CHANNELS, latent, latent, device=device)
    classes = torch.arange(batch, device=device) % 1000

    def autocast(bf16):
        return torch.autocast(device.type, torch.bfloat16, enabled=bool(bf16))

    # One function a row, as bench's.
    def encoding(bf16):
        encode = imagenet.encoder(autoencoder, msn, bf16)
        return plumbing.rate(partial(encode, images), batch, device, repeats=2)

    def training(compile, bf16):
        return unet.training_rate(unet.DiffusionConfig(arch="uvit", size=config.diffusion_size, **step, augment=0.0,
                                                       compile=compile, bf16=bf16), 3, latents)

    def evaluation(bf16):
        with autocast(bf16):
            return plumbing.rate(partial(denoise, x, 1.0, classes), batch, device, repeats=2)

    def decoding(bf16):
        with autocast(bf16):
            return plumbing.rate(partial(imagenet.decode_latents, autoencoder, x), batch, device, repeats=2)
    forward = unet.flops_per_image(model)  # an evaluation under guidance runs the network twice
    rows = [(f"encoding {config.msn_size} + {config.autoencoder_size} at {side}, batch {batch}", encoding, "images/s",
             ("bf16",), None),
            (f"U-ViT {config.diffusion_size} training, batch {step['batch']}", training, "images/s",
             ("compile", "bf16"), 3 * forward),
            (f"guided U-ViT {config.diffusion_size} evaluation", evaluation, "images/s", ("bf16",),
             forward * (1 if config.sample_guidance == 1 else 2)),
            (f"decoding {config.autoencoder_size} to {side}", decoding, "images/s", ("bf16",), None)]
    encode, train, evaluate, decode = bench_rows(config, device, rows)
    sampling = 1 / (config.sample_steps / evaluate + 1 / decode)  # DPM-Solver++(2M): one evaluation a step
    print(f"  sampling with decoding, {config.sample_steps} DPM-Solver++ steps: {sampling:,.2f} images/s")
    seconds = {"encoding": IMAGENET_IMAGES / encode,
               "stage 2": config.diffusion_images / train,
               "sampling": config.sample_per_class * 1000 / sampling}
    print(f"imagenet preset here, one device: {sum(seconds.values()) / 3600:,.1f} h (" +
          ", ".join(f"{stage} {time / 3600:,.1f} h" for stage, time in seconds.items()) +
          "; the probes and FID take minutes)")

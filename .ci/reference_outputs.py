"""The reference outputs of test_dpt.py's equality tests, computed by the original code.

    python .ci/reference_outputs.py EDM_CLONE UVIT_CLONE MSN_CLONE

EDM_CLONE: a clone of github.com/NVlabs/edm (training/networks.py: SongUNet);
UVIT_CLONE: a clone of github.com/baofff/U-ViT (libs/uvit.py: UViT, needs einops;
libs/autoencoder.py: Stable Diffusion's KL-f8 autoencoder as LDM wrote it, which
DPT's code copies unchanged);
MSN_CLONE: a clone of github.com/facebookresearch/msn (src/deit.py: the ViTs of
MSN's released checkpoints, and forward_blocks, the feature of its linear evaluation).
Not run by CI (no clones, no network there): run by hand after a change to a
network, and paste the printed REFERENCE_OUTPUTS into test_dpt.py.

The small networks of REFERENCE_NETWORKS get the same fixed weights in
both codebases (ours by fixed_network, mapped here into the original
layout), see the same inputs (in training mode the same dropout masks:
FixedDropout), and must agree to ~1e-13 in float64. Three things
in the originals are set aside, each said where it is done: EDM's attention and
noise-embedding frequencies are computed in float32 whatever the input (run here
in float64), U-ViT's flash attention casts to float32 (its "math" path is used),
and U-ViT's timestep embedding is replaced by ours (EDM's sinusoids: frequencies
1 to 1/10000 with the endpoint, sin first), a deliberate difference of our U-ViT.
"""
import functools
import math
import os
import sys
import tempfile
import zlib

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import imagenet  # noqa: E402
import unet  # noqa: E402

# -----------------------------------------------------------------------------
# The small networks of each family, with fixed weights (a formula, no random
# numbers) and fixed inputs, that both codebases run; test_dpt.py runs ours on
# them. An output is kept as its projections on 8 fixed waves and its mean square.

REFERENCE_SIDE = 8  # of the images the pixel networks are compared on
REFERENCE_NETWORKS = {
    "unet": dict(channels=3, num_classes=4, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                 attention_levels=(1,), dropout=0.1, augment_dim=data.AUGMENT_DIM),
    "uvit": dict(resolution=REFERENCE_SIDE, channels=3, num_classes=4, width=32, depth=3, heads=2, patch=2,
                 dropout=0.0),
    "autoencoder": dict(channels=32, channel_mult=(1, 2, 2), num_blocks=1),  # images of 16 -> latents of 4
    "msn": dict(resolution=16, patch=4, width=32, depth=2, heads=2),
}


def wave(count, frequency, phase=0.0):
    return torch.sin(torch.arange(count, dtype=torch.float64) * frequency + phase)


def fixed_network(arch):
    """REFERENCE_NETWORKS[arch] in float64 with weights from a formula: weight
    matrices at a unit-gain scale, norm scales near 1, tables and biases small."""
    build = {"autoencoder": imagenet.AutoencoderKL, "msn": imagenet.MSNViT, **unet.ARCHITECTURES}[arch]
    network = build(**REFERENCE_NETWORKS[arch]).double()
    with torch.no_grad():
        for index, (name, tensor) in enumerate(network.state_dict().items()):
            values = wave(tensor.numel(), 0.7, index).view_as(tensor)
            if tensor.dim() >= 2 and name not in ("label_embedding.weight", "pos_embed", "cls_token"):
                values = values * math.sqrt(3 / tensor[0].numel())
            elif "norm" in name and name.endswith("weight"):
                values = 1 + 0.1 * values
            else:
                values = 0.3 * values
            tensor.copy_(values)
    return network


def fixed_inputs(arch):
    """x [3, C, H, W], c_noise [3], labels (two classes and the null class) and
    augmentation labels (for the U-Net, which EDM tells them)."""
    shape = REFERENCE_NETWORKS[arch]
    side, channels, classes = REFERENCE_SIDE, shape["channels"], shape["num_classes"]
    x = wave(3 * channels * side * side, 0.37).view(3, channels, side, side)
    c_noise = torch.tensor([-0.5, 0.1, 0.8], dtype=torch.float64)
    augment = wave(3 * data.AUGMENT_DIM, 1.3).view(3, -1) if shape.get("augment_dim") else None
    return x, c_noise, torch.tensor([1, 3, classes]), augment


class FixedDropout:
    """torch.nn.functional.dropout with masks from a formula, so that two codebases
    drop the same units wherever they call it in the same order (random masks
    would not do: SDPA on the CPU draws from the generator, EDM's attention does
    not). Call k keeps the units where wave(k) >= 2p - 1."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        self.calls += 1
        keep = wave(x.numel(), 0.91, self.calls).view_as(x) >= 2 * p - 1
        return x * keep / (1 - p)


def fixed_autoencoder_inputs():
    """Images [2, 3, 16, 16] in [-1, 1] and scaled latents [2, 4, 4, 4]."""
    return wave(2 * 3 * 16 * 16, 0.37).view(2, 3, 16, 16), wave(2 * 4 * 4 * 4, 0.53).view(2, 4, 4, 4)


def layout_checksum(network):
    """A checksum of every state-dict name and shape."""
    return zlib.crc32("\n".join(f"{name} {tuple(t.shape)}" for name, t in network.state_dict().items()).encode())


def fingerprint(output):
    flat = output.detach().flatten().double()
    return [float(flat @ wave(len(flat), 0.05 + 0.1 * k)) for k in range(8)] + [float(flat.square().mean())]


# -----------------------------------------------------------------------------
# The original code, with our weights mapped into its layout


def edm_song_unet(edm_clone):
    """SongUNet with the DDPM++ options of EDM's train.py at REFERENCE_NETWORKS["unet"]'s size."""
    sys.path.insert(0, edm_clone)
    from training import networks
    networks.AttentionOp = type("AttentionOp", (), {"apply": staticmethod(  # EDM's softmax(Q^T K) without float32
        lambda q, k: torch.einsum("ncq,nck->nqk", q, k / np.sqrt(k.shape[1])).softmax(dim=2))})

    def positional(self, x):  # EDM's PositionalEmbedding.forward with its frequencies in x's dtype
        freqs = torch.arange(self.num_channels // 2, dtype=x.dtype) / (self.num_channels // 2 - 1)
        x = x.ger((1 / self.max_positions) ** freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)
    networks.PositionalEmbedding.forward = positional
    ours = REFERENCE_NETWORKS["unet"]
    attention = [REFERENCE_SIDE >> level for level in ours["attention_levels"]]
    return networks.SongUNet(img_resolution=REFERENCE_SIDE, in_channels=ours["channels"],
                             out_channels=ours["channels"], label_dim=ours["num_classes"],
                             augment_dim=ours["augment_dim"], model_channels=ours["model_channels"],
                             channel_mult=list(ours["channel_mult"]), num_blocks=ours["num_blocks"],
                             attn_resolutions=attention, dropout=ours["dropout"]).double()


def unet_into_edm(ours, edm):
    """Our UNet's weights in SongUNet's layout."""
    classes = REFERENCE_NETWORKS["unet"]["num_classes"]
    table = ours.label_embedding.weight  # row c = map_label(sqrt(C) one_hot(c)); the null row is its bias
    mapped = {"map_label.bias": table[classes], "map_augment.weight": ours.augment_embedding.weight,
              "map_label.weight": (table[:classes] - table[classes]).T / classes ** 0.5}
    for layer in ("map_layer0", "map_layer1"):
        for kind in ("weight", "bias"):
            mapped[f"{layer}.{kind}"] = getattr(ours, layer).state_dict()[kind]
    encoder = [name for name in edm.enc]
    decoder = [name for name in edm.dec if "aux" not in name]
    aux = [name for name in edm.dec if "aux" in name]
    pairs = [(ours.stem, f"enc.{encoder[0]}")]
    pairs += [(block, f"enc.{name}") for block, name in zip(ours.encoder, encoder[1:], strict=True)]
    pairs += [(block, f"dec.{name}") for block, name in zip([*ours.middle, *ours.decoder], decoder, strict=True)]
    pairs += [(ours.out_norm, f"dec.{aux[0]}"), (ours.out_conv, f"dec.{aux[1]}")]
    for module, prefix in pairs:
        for name, tensor in module.state_dict().items():
            if name.startswith("qkv."):  # ours: [q | k | v] channel blocks; EDM: channel c's q, k, v side by side
                tensor = tensor.unflatten(0, (3, -1)).transpose(0, 1).flatten(0, 1)
            mapped[f"{prefix}.{name}"] = tensor
    return mapped


def uvit_original(uvit_clone):
    sys.path.insert(0, uvit_clone)
    from libs import uvit
    uvit.ATTENTION_MODE = "math"  # its flash path casts to float32
    uvit.timestep_embedding = unet.positional_embedding  # ours: EDM's sinusoids (see the docstring)
    ours = REFERENCE_NETWORKS["uvit"]
    return uvit.UViT(img_size=ours["resolution"], patch_size=ours["patch"], in_chans=ours["channels"],
                     embed_dim=ours["width"], depth=ours["depth"], num_heads=ours["heads"], mlp_time_embed=True,
                     num_classes=ours["num_classes"] + 1).double()  # + 1: the null class is its last label


def uvit_into_original(ours):
    """Our UViT's weights in libs/uvit.py's layout."""
    shape = REFERENCE_NETWORKS["uvit"]
    patch, channels = shape["patch"], shape["channels"]
    renamed = {"patch_embed.": "patch_embed.proj.", "label_embedding.": "label_emb.", "final_conv.": "final_layer.",
               ".qkv.": ".attn.qkv.", ".proj.": ".attn.proj.", ".mlp.0.": ".mlp.fc1.", ".mlp.3.": ".mlp.fc2."}
    mapped = {}
    for name, tensor in ours.state_dict().items():
        if name == "pos_embed":  # ours: [noise, class, patches]; theirs: [class, noise, patches]
            tensor = tensor[:, [1, 0, *range(2, tensor.shape[1])]]
        if name.startswith("decoder_pred."):  # ours: (C, p1, p2) per token; theirs: (p1, p2, C)
            tensor = tensor.unflatten(0, (channels, patch * patch)).transpose(0, 1).flatten(0, 1)
        for old, new in renamed.items():
            if name.startswith(old) or (old.startswith(".") and old in name):
                name = name.replace(old, new, 1)
                break
        mapped[name] = tensor
    return mapped


def autoencoder_original(uvit_clone, ours, shape):
    """libs/autoencoder.py's FrozenAutoencoderKL of our AUTOENCODER_SIZES shape,
    reading our weights from a file as it reads the real checkpoint (strictly:
    every name and shape must be the checkpoint's)."""
    sys.path.insert(0, uvit_clone)
    from libs import autoencoder
    path = os.path.join(tempfile.mkdtemp(), "autoencoder_kl.pth")
    torch.save(ours.state_dict(), path)
    ddconfig = dict(double_z=True, z_channels=imagenet.LATENT_CHANNELS, resolution=256, in_channels=3, out_ch=3,
                    ch=shape["channels"], ch_mult=list(shape["channel_mult"]), num_res_blocks=shape["num_blocks"],
                    attn_resolutions=[], dropout=0.0)
    original = autoencoder.FrozenAutoencoderKL(ddconfig, imagenet.LATENT_CHANNELS, path).double()
    original.load_state_dict(ours.state_dict())  # again in float64: the file was read into float32 layers
    return original


def msn_original(msn_clone):
    sys.path.insert(0, msn_clone)
    from src import deit
    shape = REFERENCE_NETWORKS["msn"]
    network = deit.VisionTransformer(img_size=[shape["resolution"]], patch_size=shape["patch"],
                                     embed_dim=shape["width"], depth=shape["depth"], num_heads=shape["heads"],
                                     qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    return deit, network.double()


def msn_layouts_agree(deit):
    """Our vitl7 and vitb4 have the names and shapes of MSN's deit_large_p7 and
    deit_base_p4 at 224x224, but for the final LayerNorm and the head, which the
    feature does not use (and which the loader drops)."""
    for ours, theirs in (("vitl7", deit.deit_large_p7), ("vitb4", deit.deit_base_p4)):
        network = imagenet.MSNViT(224, **imagenet.MSN_SIZES[ours])
        their_layout = {name: tuple(t.shape) for name, t in theirs().state_dict().items()
                        if not name.startswith(("norm.", "fc."))}
        assert their_layout == {name: tuple(t.shape) for name, t in network.state_dict().items()}, ours
        print(f"msn: {ours} has the layout of MSN's checkpoint, checksum {layout_checksum(network)}",
              file=sys.stderr)


def load_exactly(network, mapped):
    """Every parameter of the original set from ours (EDM's resampling filters are fixed buffers)."""
    missing, unexpected = network.load_state_dict(mapped, strict=False)
    assert not unexpected and all(name.endswith("resample_filter") for name in missing), (missing, unexpected)


def main(edm_clone, uvit_clone, msn_clone):
    outputs = {}
    x, c_noise, labels, augment = fixed_inputs("unet")
    ours, edm = fixed_network("unet"), edm_song_unet(edm_clone)
    load_exactly(edm, unet_into_edm(ours, edm))
    one_hot = torch.nn.functional.one_hot(labels, ours.label_embedding.num_embeddings).double()[:, :-1]  # null: 0
    for mode in ("eval", "train"):
        ours.train(mode == "train"), edm.train(mode == "train")
        torch.nn.functional.dropout = FixedDropout()  # the same masks in both, call by call
        theirs = edm(x, c_noise, one_hot, augment)
        torch.nn.functional.dropout = FixedDropout()
        difference = (ours(x, c_noise, labels, augment) - theirs).abs().max().item()
        print(f"unet {mode}: largest difference from EDM's SongUNet {difference:.1e}", file=sys.stderr)
        assert difference < 1e-12
        outputs[f"unet-{mode}"] = fingerprint(theirs)

    x, c_noise, labels, _ = fixed_inputs("uvit")
    ours, original = fixed_network("uvit"), uvit_original(uvit_clone)
    load_exactly(original, uvit_into_original(ours))
    for mode in ("eval", "train"):  # no dropout in U-ViT: train mode must change nothing
        ours.train(mode == "train"), original.train(mode == "train")
        theirs = original(x, c_noise, labels)
        difference = (ours(x, c_noise, labels) - theirs).abs().max().item()
        print(f"uvit {mode}: largest difference from libs/uvit.py {difference:.1e}", file=sys.stderr)
        assert difference < 1e-12
        outputs[f"uvit-{mode}"] = fingerprint(theirs)
    stable_diffusion = imagenet.AutoencoderKL(**imagenet.AUTOENCODER_SIZES["sd"])
    autoencoder_original(uvit_clone, stable_diffusion, imagenet.AUTOENCODER_SIZES["sd"])  # loads: the same layout
    print(f"autoencoder: Stable Diffusion's layout, checksum {layout_checksum(stable_diffusion)}",
          file=sys.stderr)
    ours = fixed_network("autoencoder")
    original = autoencoder_original(uvit_clone, ours, REFERENCE_NETWORKS["autoencoder"])
    images, latents = fixed_autoencoder_inputs()
    mean, logvar = original.encode_moments(images).chunk(2, dim=1)
    theirs = {"encode": torch.cat([mean, logvar.clamp(-30.0, 20.0)]), "decode": original.decode(latents)}
    differences = ((torch.cat(ours.encode(images)) - theirs["encode"]).abs().max().item(),
                   (ours.decode(latents) - theirs["decode"]).abs().max().item())
    print(f"autoencoder: largest differences from libs/autoencoder.py {differences[0]:.1e} (encode), "
          f"{differences[1]:.1e} (decode)", file=sys.stderr)
    assert max(differences) < 1e-12
    outputs.update({f"autoencoder-{name}": fingerprint(output) for name, output in theirs.items()})
    deit, original = msn_original(msn_clone)
    msn_layouts_agree(deit)
    ours = fixed_network("msn")
    missing, unexpected = original.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["norm.bias", "norm.weight"], (missing, unexpected)
    images = fixed_autoencoder_inputs()[0]
    theirs = original.forward_blocks(images, num_blocks=1)
    difference = (ours(images) - theirs).abs().max().item()
    print(f"msn: largest difference from deit.py's forward_blocks {difference:.1e}", file=sys.stderr)
    assert difference < 1e-12
    outputs["msn"] = fingerprint(theirs)
    print("REFERENCE_OUTPUTS = {")
    for name, values in outputs.items():
        print(f'    "{name}": [{", ".join(repr(value) for value in values)}],')
    print("}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    with torch.no_grad():
        main(*sys.argv[1:])

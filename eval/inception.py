"""The Inception-v3 feature network of FID and IS, loaded from a local file: nothing is ever downloaded.

- `legacy`: torchmetrics' NoTrainInceptionV3, torch-fidelity's port of the 2015 TF graph that ADM and EDM2 use,
  with the TF1 bilinear resize to 299x299 (antialias=False: torchmetrics >= 1.8 antialiases by default, which is
  not the resize of the published reference statistics). Pool features (2048) and `logits_unbiased` (1008
  classes, the head torch-fidelity and torchmetrics compute IS from).
- `clean`: clean-fid's TorchScript `inception-2015-12-05.pt` after clean-fid's PIL bicubic resize of the uint8
  image (Parmar et al. 2022). Pool features only: that file's head is not reached through its feature layers.
- `random`: the legacy architecture with a fixed random initialisation, for demos and tests where no weights
  can be had. Its numbers are comparable only with other numbers of the same initialisation, so it says so
  (`random`, and an `extractor` id naming the seed); metrics computed with it are named *_random_inception.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

Mode = Literal["legacy", "clean"]

LEGACY_FILE = "weights-inception-2015-12-05-6726825d.pth"
LEGACY_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + LEGACY_FILE
CLEAN_FILE = "inception-2015-12-05.pt"
CLEAN_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + CLEAN_FILE
GRAPH = "inception-2015-12-05"
RANDOM_SEED = 0
# A random-initialisation file says so itself, in a buffer eval mode never reads: the first BatchNorm's batch
# count holds -1 - seed, a count no trained network has. A file written by `write_random_weights` is therefore
# never taken for the 2015 network, and its statistics never pass for the published ones.
_MARK = "Conv2d_1a_3x3.bn.num_batches_tracked"


class FeatureNetwork(nn.Module):
    """uint8 images (B, 3, H, W) at any resolution -> (pool features (B, 2048), logits (B, 1008) or None), float64."""

    num_features = 2048

    def __init__(self, mode: Mode, extractor: str, random: bool):
        super().__init__()
        self.mode, self.extractor, self.random = mode, extractor, random

    @staticmethod
    def check(images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the Inception network takes uint8 images (B, 3, H, W), found {images.dtype} "
                             f"{tuple(images.shape)}")


class _Legacy(FeatureNetwork):
    def __init__(self, state_dict: dict[str, Tensor]):
        from torchmetrics.image.fid import NoTrainInceptionV3

        mark = int(state_dict[_MARK]) if _MARK in state_dict else 0
        if mark < 0:
            super().__init__("legacy", f"random-inception-seed{-1 - mark}/legacy", random=True)
        else:
            super().__init__("legacy", f"{GRAPH}/legacy", random=False)
        # torch-fidelity reads its weights with torch.load(weights_only=False); it gets tensors already read with
        # weights_only=True (or built), re-serialised in memory, so the user's file never meets a full unpickler
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        self.net = NoTrainInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], buffer, antialias=False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        self.check(images)
        # the public forward returns only the first requested output; this is the same pass with both
        features, logits = self.net._torch_fidelity_forward(images.to(self.net.fc.weight.device))
        return features.double(), logits.double()


class _Clean(FeatureNetwork):
    def __init__(self, folder: str):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        super().__init__("clean", f"{GRAPH}/clean", random=False)
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice: nothing a user can act on
            warnings.simplefilter("ignore", FutureWarning)
            self.net = InceptionV3W(folder, download=False)
        self.resize = build_resizer("clean")  # per channel, in float: the resized image is not re-quantised

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, None]:
        self.check(images)
        resized = np.stack([self.resize(image) for image in images.permute(0, 2, 3, 1).cpu().numpy()])
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(next(self.net.parameters()).device)
        return self.net(x).double(), None


def random_state_dict(seed: int = RANDOM_SEED) -> dict[str, Tensor]:
    """The legacy network's weights at a fixed random initialisation, from a generator seeded by `seed`.

    torchvision's Inception3 without auxiliary head and with 1008 classes has exactly the keys and shapes of
    torch-fidelity's extractor. Its default initialisation leaves the pool features near 1e-8, every image alike
    and every FID near 0; He initialisation (fan_in, ReLU) of every convolution keeps the activations' scale
    through the 94 layers (BatchNorm in eval mode is the identity here), so different images stay different."""
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=generator)
    nn.init.kaiming_normal_(net.fc.weight, mode="fan_in", nonlinearity="linear", generator=generator)
    nn.init.zeros_(net.fc.bias)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state[_MARK] = torch.tensor(-1 - seed)
    return state


def write_random_weights(path: str, seed: int = RANDOM_SEED) -> None:
    """A legacy-mode weights file (a state dict, as torch-fidelity's) holding `random_state_dict(seed)`."""
    torch.save(random_state_dict(seed), path)


def _weights_file(path: str, mode: Mode) -> str:
    name, url = (LEGACY_FILE, LEGACY_URL) if mode == "legacy" else (CLEAN_FILE, CLEAN_URL)
    file = os.path.join(path, name) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no Inception weights at {file}: {mode} mode needs {name} (from {url}); copy it "
                                f"to this machine and pass its path (--inception PATH), or 'random'")
    if mode == "clean" and os.path.basename(file) != CLEAN_FILE:
        raise ValueError(f"clean mode loads clean-fid's {CLEAN_FILE} by that name, found {file}: rename it")
    return file


def load(path: str, mode: Mode = "legacy", device: str | torch.device = "cpu") -> FeatureNetwork:
    """The feature network from a weights file (or the folder holding it under its usual name), or "random"."""
    if mode not in ("legacy", "clean"):
        raise ValueError(f"fid mode must be legacy or clean, found {mode!r}")
    if path == "random":
        if mode != "legacy":
            raise ValueError("the random Inception exists in legacy mode only: use --fid-mode legacy")
        net: FeatureNetwork = _Legacy(random_state_dict())
    elif mode == "legacy":
        net = _Legacy(torch.load(_weights_file(path, mode), map_location="cpu", weights_only=True))
    else:
        net = _Clean(os.path.dirname(os.path.abspath(_weights_file(path, mode))))
    return net.to(device).eval()

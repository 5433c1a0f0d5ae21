"""V: the World Models convolutional VAE (Ha & Schmidhuber 2018, appendix A.1).

Encoder: 64x64x3 -> four conv layers (kernel 4, stride 2, ReLU; 32/64/128/256 channels) -> 2x2x256 ->
linear heads for mu and log sigma^2 of q(z|x) = N(mu, diag(exp(logvar))).
Decoder: z -> linear 1024 -> 1x1x1024 -> four transposed convs (kernels 5, 5, 6, 6, stride 2; ReLU, then a
sigmoid) -> 64x64x3 in [0, 1].

Loss (as in the original code, with an optional weight w per pixel, 1 by default):
    recon = sum_pixels w (x - x_hat)^2                     (mean over the batch)
    kl    = max(KL(q(z|x) || N(0, I)), kl_tolerance * Z)   (per frame, then mean over the batch)
    KL    = -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))
The clamp is "free bits": below kl_tolerance nats per dimension on average the KL term has no gradient, so
the model spends that much information on the frame for free. The weight is how ``vae.player_weight`` (and
``enemy_weight``) makes a few pixels (Mario, about 4 x 4 of 64 x 64) count: unweighted, V leaves him out and
still scores well.
"""

from __future__ import annotations

from pathlib import Path
from typing import overload

import numpy as np
import torch
from torch import Tensor, nn

from frmdn_worldmodels.runtime.io import DataError, load_checkpoint


class ConvVAE(nn.Module):
    """The World Models ConvVAE for 64x64 RGB frames in [0, 1]."""

    def __init__(self, latent_dim: int = 32):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2),
            nn.ReLU(),  # 64 -> 31
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),  # 31 -> 14
            nn.Conv2d(64, 128, 4, stride=2),
            nn.ReLU(),  # 14 -> 6
            nn.Conv2d(128, 256, 4, stride=2),
            nn.ReLU(),  # 6 -> 2
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(2 * 2 * 256, latent_dim)
        self.fc_logvar = nn.Linear(2 * 2 * 256, latent_dim)
        self.fc_decode = nn.Linear(latent_dim, 1024)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(1024, 128, 5, stride=2),
            nn.ReLU(),  # 1 -> 5
            nn.ConvTranspose2d(128, 64, 5, stride=2),
            nn.ReLU(),  # 5 -> 13
            nn.ConvTranspose2d(64, 32, 6, stride=2),
            nn.ReLU(),  # 13 -> 30
            nn.ConvTranspose2d(32, 3, 6, stride=2),
            nn.Sigmoid(),  # 30 -> 64
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x ``[B, 3, 64, 64]`` in [0, 1] -> (mu, logvar), each ``[B, Z]``."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: Tensor) -> Tensor:
        """z ``[B, Z]`` -> frames ``[B, 3, 64, 64]`` in [0, 1]."""
        return self.decoder(self.fc_decode(z)[:, :, None, None])

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, draw z = mu + exp(logvar / 2) * eps, decode: (recon, mu, logvar)."""
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar, generator)), mu, logvar


@overload
def posterior_sample(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor: ...


@overload
def posterior_sample(mu: np.ndarray, logvar: np.ndarray, eps: np.ndarray) -> np.ndarray: ...


def posterior_sample(
    mu: Tensor | np.ndarray, logvar: Tensor | np.ndarray, eps: Tensor | np.ndarray
) -> Tensor | np.ndarray:
    """z = mu + exp(logvar / 2) * eps: the draw from q(z|x) = N(mu, diag(exp(logvar))) that standard normal
    ``eps`` gives (torch tensors, gradients flowing through mu and logvar, or numpy arrays). The one place of
    the formula: callers differ only in where eps comes from (a generator, a numpy rng, one generator per
    episode)."""
    exp = torch.exp if isinstance(logvar, Tensor) else np.exp
    return mu + exp(0.5 * logvar) * eps


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A draw z ~ N(mu, diag(exp(logvar))) that gradients flow through (eps from ``generator``)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return posterior_sample(mu, logvar, eps)


def vae_loss(
    recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, kl_tolerance: float, weight: Tensor | None = None
) -> dict[str, Tensor]:
    """World Models loss: summed squared error (each pixel's times ``weight``, broadcast to ``x``, when given)
    + KL clamped below at ``kl_tolerance * Z`` (means over the batch)."""
    squared = (recon - x).pow(2)
    if weight is not None:
        squared = squared * weight
    recon_loss = squared.flatten(1).sum(dim=1).mean()
    kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
    kl_loss = kl.clamp(min=kl_tolerance * mu.shape[1]).mean()
    return {"loss": recon_loss + kl_loss, "recon": recon_loss, "kl": kl_loss}


def frames_to_tensor(obs: np.ndarray, device: str | torch.device = "cpu") -> Tensor:
    """uint8 frames ``[..., H, W, 3]`` -> float tensor ``[..., 3, H, W]`` in [0, 1] on ``device``."""
    obs = np.asarray(obs)
    if obs.dtype != np.uint8 or obs.ndim < 3 or obs.shape[-1] != 3:
        raise ValueError(
            f"frames_to_tensor: expected uint8 [..., H, W, 3] frames, got {obs.dtype} {obs.shape}"
        )
    # convert on the device: a uint8 copy is 4x smaller than a float one
    tensor = torch.from_numpy(np.ascontiguousarray(obs)).to(device)
    return tensor.movedim(-1, -3).float().div_(255.0).contiguous()


def tensor_to_frames(x: Tensor) -> np.ndarray:
    """Float tensor ``[..., 3, H, W]`` in [0, 1] -> uint8 numpy ``[..., H, W, 3]`` (rounded)."""
    x = x.detach().movedim(-3, -1).clamp(0.0, 1.0).mul(255.0).round()
    return x.to(device="cpu", dtype=torch.uint8).numpy()


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> ConvVAE:
    """The ConvVAE of a checkpoint holding ``state_dict`` (and ``config``), in eval mode on ``device``."""
    payload = load_checkpoint(path, map_location=device)
    state = payload.get("state_dict")
    if not isinstance(state, dict) or "fc_mu.weight" not in state:
        raise DataError(f"{path}: not a ConvVAE checkpoint (no state_dict with fc_mu.weight)")
    # the latent size is read off the weights, so a checkpoint loads whatever config is current
    vae = ConvVAE(latent_dim=state["fc_mu.weight"].shape[0])
    try:
        vae.load_state_dict(state)
    except RuntimeError as error:
        raise DataError(f"{path}: ConvVAE weights do not fit the model ({error})") from None
    return vae.to(device).eval()

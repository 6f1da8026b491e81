"""Learned generators: a small convolutional VAE trained on the real images of one class.

:class:`ConditionalVAEGenerator` (name ``"cvae"``) is conditional on the class by construction: the
augmenter hands a :class:`~dlforge.augmenter.generators.Generator` the images of *one* class, and the
VAE is trained on exactly those, so it models p(image | class). It works at 64 px (the input is
resized in and the samples are resized back out to the input's side), on the input's channels, and
is small enough to train on a 2-core CPU in about a minute.

Sampling modes:

* ``"prior"``: z ~ N(0, I), decoded; the parent is the real image whose latent mean is nearest.
* ``"perturb"``: a random real image is encoded and its latent moved by ``noise`` x its posterior
  spread; the parent is that image.
* ``"interpolate"``: the latent means of two real images of the class, mixed with lam ~ U(0.2, 0.8);
  the parent is the one with the larger weight.
* ``"residual"`` (the default): like ``"perturb"``, but the sample is the real parent at full resolution
  plus the change the latent move makes to its decoding (decode(z') - decode(mu), upsampled): the VAE's
  variation on the parent's own fine detail (cracks, busbars), which a 64 px decoder blurs away.

The trained network depends only on the images, ``seed`` and the training budget (it is cached for
the same images, so the worker's chunked calls train once); the samples depend on the ``rng`` passed
to :meth:`ConditionalVAEGenerator.generate`. With a step budget (``steps``) that finishes inside
``seconds`` the result is deterministic; when the time budget stops training first, the number of
steps (recorded in :attr:`ConditionalVAEGenerator.last_fit`) depends on the machine's speed.
torch is imported lazily. Training runs on one torch thread by default: these small convolutions gain
nothing from a second one and contend badly on a busy 2-core machine (measured: 0.05 s per step on one
thread, 0.8 s on two, with the load average at 3).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from dlforge.augmenter.filters import resize_batch
from dlforge.augmenter.generators import Generated, _check_sources
from dlforge.common.errors import ConfigError

Mode = Literal["prior", "perturb", "interpolate", "residual"]
MODES: tuple[str, ...] = get_args(Mode)


@dataclass(frozen=True)
class VAEFit:
    """How the last VAE was trained."""

    steps: int
    seconds: float
    final_loss: float
    images: int
    stopped_by: str  # "steps" or "time"


@contextmanager
def _torch_threads(limit: int) -> Iterator[None]:
    """Torch on at most ``limit`` threads inside (never more than it had), the count restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, limit))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _training_key(images: np.ndarray, *settings: object) -> str:
    """What a trained network depends on: the images' bytes and shape and the training settings."""
    h = hashlib.sha256(images.tobytes())
    h.update(repr((images.shape, *settings)).encode())
    return h.hexdigest()


def _unit_tensor(images: np.ndarray, size: int) -> Any:
    """uint8 N x H x W x C images resized to ``size`` as a float N x C x size x size tensor in [0, 1]."""
    import torch

    small = resize_batch(images, size)
    return torch.from_numpy(np.ascontiguousarray(small.transpose(0, 3, 1, 2))).float().div_(255.0)


def _random_flips(batch: Any, gen: Any) -> Any:
    """Each image of an N x C x H x W batch flipped left-right and upside down, each with probability 1/2."""
    import torch

    fh = torch.rand(len(batch), generator=gen) < 0.5
    fv = torch.rand(len(batch), generator=gen) < 0.5
    batch = torch.where(fh[:, None, None, None], batch.flip(3), batch)
    return torch.where(fv[:, None, None, None], batch.flip(2), batch)


def _build_vae(channels: int, latent_dim: int, width: int, size: int) -> Any:
    import torch
    from torch import nn

    w, s = width, size // 16

    class VAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(  # size -> size / 16
                nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(0.2),
                nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2),
                nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2),
                nn.Conv2d(4 * w, 4 * w, 4, 2, 1), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2),
                nn.Flatten(),
            )
            self.mu = nn.Linear(4 * w * s * s, latent_dim)
            self.logvar = nn.Linear(4 * w * s * s, latent_dim)
            self.project = nn.Linear(latent_dim, 4 * w * s * s)
            self.decoder = nn.Sequential(  # size / 16 -> size
                nn.ConvTranspose2d(4 * w, 4 * w, 4, 2, 1), nn.BatchNorm2d(4 * w), nn.ReLU(),
                nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU(),
                nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Sigmoid(),
            )

        def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.encoder(x)
            return self.mu(h), self.logvar(h).clamp(-10.0, 10.0)

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.project(z).view(-1, 4 * w, s, s))  # type: ignore[no-any-return]

    return VAE()


class ConditionalVAEGenerator:
    """A convolutional VAE per class at ``size`` px; samples decoded from the prior or from real latents."""

    name = "cvae"

    def __init__(
        self,
        *,
        size: int = 64,
        latent_dim: int = 32,
        width: int = 16,
        steps: int = 1500,
        seconds: float | None = 90.0,
        batch_size: int = 32,
        lr: float = 2e-3,
        beta: float = 1.0,
        mode: str = "residual",
        noise: float = 1.0,
        flips: bool = True,
        seed: int = 0,
        threads: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 16 or size % 16:
            raise ConfigError(f"cvae size {size} must be a multiple of 16")
        if mode not in MODES:
            raise ConfigError(f"unknown cvae sampling mode {mode!r}; known: {', '.join(MODES)}")
        if steps < 1:
            raise ConfigError("cvae needs at least one training step")
        if seconds is not None and seconds <= 0:
            raise ConfigError("cvae time budget must be > 0 seconds")
        if latent_dim < 1 or width < 1 or batch_size < 1 or lr <= 0 or beta < 0 or noise < 0:
            raise ConfigError("cvae: latent_dim, width, batch_size, lr must be positive; beta, noise >= 0")
        self.size, self.latent_dim, self.width = size, latent_dim, width
        self.steps, self.seconds, self.batch_size, self.lr, self.beta = steps, seconds, batch_size, lr, beta
        self.mode, self.noise, self.flips, self.seed, self.threads = mode, noise, flips, seed, threads
        self.clock = clock
        self.last_fit: VAEFit | None = None
        self._cache: tuple[str, Any, np.ndarray, np.ndarray] | None = None  # digest, model, mu, logvar

    # -- training -------------------------------------------------------------------------------

    def fit(self, images: np.ndarray) -> Any:
        """Train (or reuse) the VAE on ``images``; returns the model in eval mode."""
        _check_sources(images)
        key = _training_key(images, self.size, self.latent_dim, self.width, self.steps, self.seconds,
                            self.batch_size, self.lr, self.beta, self.flips, self.seed)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        import torch
        import torch.nn.functional as F

        with _torch_threads(self.threads):
            torch.manual_seed(self.seed)
            gen = torch.Generator().manual_seed(self.seed)
            x = _unit_tensor(images, self.size)
            model = _build_vae(images.shape[3], self.latent_dim, self.width, self.size)
            opt = torch.optim.Adam(model.parameters(), lr=self.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps, eta_min=self.lr / 20)
            model.train()
            started = self.clock()
            pixels = float(x[0].numel())
            step, loss_value, stopped_by = 0, float("nan"), "steps"
            while step < self.steps:
                if self.seconds is not None and self.clock() - started >= self.seconds:
                    stopped_by = "time"
                    break
                idx = torch.randint(0, len(x), (min(self.batch_size, max(2, len(x))),), generator=gen)
                batch = _random_flips(x[idx], gen) if self.flips else x[idx]
                mu, logvar = model.encode(batch)
                eps = torch.randn(mu.shape, generator=gen)
                recon = model.decode(mu + eps * torch.exp(0.5 * logvar))
                rec = F.binary_cross_entropy(recon, batch, reduction="sum") / len(batch)
                kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(batch)
                # the KL weight ramps in over the first quarter (avoids posterior collapse on tiny sets)
                warm = min(1.0, (step + 1) / max(1, self.steps // 4))
                loss = rec + self.beta * warm * kl
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                loss_value = float(loss.item()) / pixels
                step += 1
            model.eval()
            with torch.no_grad():
                mu_all, logvar_all = model.encode(x)
            self.last_fit = VAEFit(steps=step, seconds=round(self.clock() - started, 3),
                                   final_loss=loss_value, images=len(images), stopped_by=stopped_by)
            self._cache = (key, model, mu_all.numpy().astype(np.float64), logvar_all.numpy().astype(np.float64))
            return model

    # -- sampling -------------------------------------------------------------------------------

    def generate(self, images: np.ndarray, n: int, rng: np.random.Generator) -> Generated:
        _check_sources(images)
        if n <= 0:
            return Generated.concat([], like=images)
        model = self.fit(images)
        assert self._cache is not None
        _, _, mu, logvar = self._cache
        m = len(images)
        if self.mode == "prior":
            z = rng.standard_normal((n, self.latent_dim))
            dist = ((z[:, None, :] - mu[None, :, :]) ** 2).sum(axis=2)
            parents = dist.argmin(axis=1)
            recipes = ["cvae:prior"] * n
        elif self.mode == "perturb":
            parents = rng.integers(0, m, size=n)
            sigma = np.exp(0.5 * logvar[parents])
            z = mu[parents] + self.noise * sigma * rng.standard_normal((n, self.latent_dim))
            recipes = [f"cvae:perturb:{self.noise:g}"] * n
        elif self.mode == "residual":
            parents = rng.integers(0, m, size=n)
            sigma = np.exp(0.5 * logvar[parents])
            z = mu[parents] + self.noise * sigma * rng.standard_normal((n, self.latent_dim))
            out = self._residual(model, images, parents, mu[parents], z)
            return Generated(out, parents.astype(np.int64), [f"cvae:residual:{self.noise:g}"] * n)
        else:
            a = rng.integers(0, m, size=n)
            b = (a + rng.integers(1, m, size=n)) % m if m > 1 else a.copy()
            lam = rng.uniform(0.2, 0.8, size=n)
            z = lam[:, None] * mu[a] + (1 - lam[:, None]) * mu[b]
            parents = np.where(lam >= 0.5, a, b)
            recipes = [f"cvae:interpolate:{v:.2f}" for v in lam]
        out = self._decode(model, z)
        out = resize_batch(out, images.shape[1]) if out.shape[1:3] != images.shape[1:3] else out
        return Generated(np.ascontiguousarray(out), parents.astype(np.int64), recipes)

    def _residual(self, model: Any, images: np.ndarray, parents: np.ndarray, base: np.ndarray, z: np.ndarray
                  ) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with _torch_threads(self.threads), torch.no_grad():
            delta = model.decode(torch.from_numpy(z.astype(np.float32))) - model.decode(
                torch.from_numpy(base.astype(np.float32)))
            side = images.shape[1:3]
            if tuple(delta.shape[2:]) != side:
                delta = F.interpolate(delta, size=side, mode="bilinear", align_corners=False)
        out = images[parents].astype(np.float32) + delta.numpy().transpose(0, 2, 3, 1) * 255.0
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def _decode(self, model: Any, z: np.ndarray) -> np.ndarray:
        import torch

        with _torch_threads(self.threads), torch.no_grad():
            x = model.decode(torch.from_numpy(z.astype(np.float32)))
        arr = np.clip(np.rint(x.numpy() * 255.0), 0, 255).astype(np.uint8)
        return arr.transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------
# A second learned family for comparison: a tiny DCGAN per class
# ------------------------------------------------------------------------------------------------


def _build_gan(channels: int, latent_dim: int, width: int, size: int) -> tuple[Any, Any]:
    from torch import nn

    w, s = width, size // 16
    generator = nn.Sequential(
        nn.Linear(latent_dim, 4 * w * s * s), nn.Unflatten(1, (4 * w, s, s)), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.ConvTranspose2d(4 * w, 4 * w, 4, 2, 1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Sigmoid(),
    )
    discriminator = nn.Sequential(
        nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(4 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(4 * w * s * s, 1),
    )
    return generator, discriminator


class DCGANGenerator:
    """A tiny DCGAN per class at ``size`` px (non-saturating loss, flips as augmentation); samples from the
    prior; the parent is the real image nearest in pixels at ``size`` px. Same budget and caching rules
    as :class:`ConditionalVAEGenerator`."""

    name = "dcgan"

    def __init__(self, *, size: int = 64, latent_dim: int = 32, width: int = 16, steps: int = 1500,
                 seconds: float | None = 90.0, batch_size: int = 32, lr: float = 2e-4, flips: bool = True,
                 seed: int = 0, threads: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 16 or size % 16:
            raise ConfigError(f"dcgan size {size} must be a multiple of 16")
        if steps < 1 or (seconds is not None and seconds <= 0) or latent_dim < 1 or width < 1 or lr <= 0:
            raise ConfigError("dcgan: steps, seconds, latent_dim, width and lr must be positive")
        self.size, self.latent_dim, self.width, self.steps, self.seconds = size, latent_dim, width, steps, seconds
        self.batch_size, self.lr, self.flips, self.seed, self.threads, self.clock = (
            batch_size, lr, flips, seed, threads, clock)
        self.last_fit: VAEFit | None = None
        self._cache: tuple[str, Any, np.ndarray] | None = None  # digest, generator net, real images at size

    def fit(self, images: np.ndarray) -> Any:
        _check_sources(images)
        key = _training_key(images, self.size, self.latent_dim, self.width, self.steps, self.seconds,
                            self.batch_size, self.lr, self.flips, self.seed)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        import torch
        import torch.nn.functional as F

        with _torch_threads(self.threads):
            torch.manual_seed(self.seed)
            gen = torch.Generator().manual_seed(self.seed)
            x = _unit_tensor(images, self.size)
            net_g, net_d = _build_gan(images.shape[3], self.latent_dim, self.width, self.size)
            opt_g = torch.optim.Adam(net_g.parameters(), lr=self.lr, betas=(0.5, 0.999))
            opt_d = torch.optim.Adam(net_d.parameters(), lr=self.lr, betas=(0.5, 0.999))
            started = self.clock()
            step, loss_value, stopped_by = 0, float("nan"), "steps"
            b = min(self.batch_size, max(2, len(x)))
            while step < self.steps:
                if self.seconds is not None and self.clock() - started >= self.seconds:
                    stopped_by = "time"
                    break
                real = x[torch.randint(0, len(x), (b,), generator=gen)]
                if self.flips:
                    real = _random_flips(real, gen)
                fake = net_g(torch.randn((b, self.latent_dim), generator=gen))
                d_loss = (F.binary_cross_entropy_with_logits(net_d(real), torch.full((b, 1), 0.9))
                          + F.binary_cross_entropy_with_logits(net_d(fake.detach()), torch.zeros(b, 1)))
                opt_d.zero_grad()
                d_loss.backward()
                opt_d.step()
                g_loss = F.binary_cross_entropy_with_logits(net_d(fake), torch.ones(b, 1))
                opt_g.zero_grad()
                g_loss.backward()
                opt_g.step()
                loss_value = float(g_loss.item())
                step += 1
            net_g.eval()
            self.last_fit = VAEFit(steps=step, seconds=round(self.clock() - started, 3), final_loss=loss_value,
                                   images=len(images), stopped_by=stopped_by)
            real = np.rint(x.numpy().transpose(0, 2, 3, 1) * 255.0)  # the resized images again, N x S x S x C
            self._cache = (key, net_g, real.reshape(len(real), -1).astype(np.float32))
            return net_g

    def generate(self, images: np.ndarray, n: int, rng: np.random.Generator) -> Generated:
        import torch

        _check_sources(images)
        if n <= 0:
            return Generated.concat([], like=images)
        net_g = self.fit(images)
        assert self._cache is not None
        flat_real = self._cache[2]
        z = rng.standard_normal((n, self.latent_dim)).astype(np.float32)
        with _torch_threads(self.threads), torch.no_grad():
            x = net_g(torch.from_numpy(z)).numpy()
        out = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        flat = out.reshape(n, -1).astype(np.float32)
        dist = (flat ** 2).sum(1)[:, None] - 2 * flat @ flat_real.T + (flat_real ** 2).sum(1)[None, :]
        parents = dist.argmin(axis=1).astype(np.int64)
        out = resize_batch(out, images.shape[1]) if out.shape[1:3] != images.shape[1:3] else out
        return Generated(np.ascontiguousarray(out), parents, ["dcgan:prior"] * n)

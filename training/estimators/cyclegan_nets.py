"""CycleGAN's networks: generators that map rows to rows of the same shape, and discriminators.

Every network takes flat rows [N, D] — the wire format of the served ``translate`` graphs —
and, for images, reshapes them to [N, C, H, W] inside, so the exported graph is the generator
itself.

* ``ConvGenerator`` — the paper's encoder → residual blocks → decoder (Johnson et al.'s
  transformation net), scaled to small images: a 3×3 stem, ``downsamplings`` stride-2 convs,
  ``blocks`` residual blocks, as many stride-2 transposed convs back up, a 3×3 head. Instance
  norm as in the paper (each image normalised on its own, so a translation does not depend on
  the rest of the batch and the served graph equals the trained one). Fully convolutional: the
  same weights translate any image size divisible by 2^downsamplings, and the small receptive
  field is the inductive bias that makes unpaired translation local (stroke width, texture).
* ``MLPGenerator`` — for rows that are not images: two hidden layers.
* ``ConvDiscriminator`` — a PatchGAN: a map of real/fake scores, one per overlapping patch,
  rather than one per image (least-squares loss, so no sigmoid). ``MLPDiscriminator`` for rows.

Outputs: with data in [0, 1] (images, the ``bounded`` case) the generator ends in a sigmoid so a
translation is always a valid image; otherwise the last layer is linear.
"""

from __future__ import annotations

import torch
from torch import nn


NORMS = ("instance", "none")


def _output(bounded: bool) -> nn.Module:
    return nn.Sigmoid() if bounded else nn.Identity()


def _norm(kind: str, width: int) -> nn.Module:
    return nn.InstanceNorm2d(width) if kind == "instance" else nn.Identity()


class ResidualBlock(nn.Module):
    """x + conv-norm-relu-conv-norm(x), 3×3 convs with reflection padding as in the paper."""

    def __init__(self, width: int, norm: str = "instance"):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), _norm(norm, width), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), _norm(norm, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvGenerator(nn.Module):
    """Rows [N, C·H·W] -> rows [N, C·H·W]; encoder, ``blocks`` residual blocks, decoder."""

    def __init__(self, image_shape: tuple[int, int, int], width: int = 32, blocks: int = 2,
                 downsamplings: int = 1, bounded: bool = True, norm: str = "instance"):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c = image_shape[0]
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(c, width, 3), _norm(norm, width), nn.ReLU()]
        w = width
        for _ in range(downsamplings):
            layers += [nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), _norm(norm, 2 * w), nn.ReLU()]
            w *= 2
        layers += [ResidualBlock(w, norm) for _ in range(blocks)]
        for _ in range(downsamplings):
            layers += [nn.ConvTranspose2d(w, w // 2, 3, stride=2, padding=1, output_padding=1),
                       _norm(norm, w // 2), nn.ReLU()]
            w //= 2
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(w, c, 3), _output(bounded)]
        self.net = nn.Sequential(*layers)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        images = rows.reshape(-1, *self.image_shape)
        return self.net(images).reshape(rows.shape[0], -1)


class MLPGenerator(nn.Module):
    """Rows [N, D] -> rows [N, D] through two hidden layers."""

    def __init__(self, features: int, hidden: int = 256, bounded: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, features), _output(bounded))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows)


class ConvDiscriminator(nn.Module):
    """PatchGAN: rows [N, C·H·W] -> one least-squares score per patch, [N, P]."""

    def __init__(self, image_shape: tuple[int, int, int], width: int = 32, downsamplings: int = 1,
                 norm: str = "instance"):
        super().__init__()
        self.image_shape = tuple(image_shape)
        layers: list[nn.Module] = [nn.Conv2d(image_shape[0], width, 3, padding=1), nn.LeakyReLU(0.2)]
        w = width
        for _ in range(downsamplings):
            layers += [nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), _norm(norm, 2 * w), nn.LeakyReLU(0.2)]
            w *= 2
        layers += [nn.Conv2d(w, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows.reshape(-1, *self.image_shape)).reshape(rows.shape[0], -1)


class MLPDiscriminator(nn.Module):
    """Rows [N, D] -> one least-squares score per row, [N, 1]."""

    def __init__(self, features: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows)


class Generators(nn.Module):
    """G and F as one module, so one (DDP-wrapped) call runs everything a generator step needs.

    Returns G(a), F(b), the round trips F(G(a)), G(F(b)) and, when ``identity`` is set, the
    identity terms G(b), F(a). A and B rows go through each generator in one batch (the networks
    treat rows independently), so a step is four network calls rather than six.
    """

    def __init__(self, G: nn.Module, F: nn.Module):
        super().__init__()
        self.G, self.F = G, F

    def forward(self, a: torch.Tensor, b: torch.Tensor, identity: bool) -> tuple[torch.Tensor, ...]:
        n_a, n_b = len(a), len(b)
        if identity:
            fake_b, g_of_b = self.G(torch.cat([a, b])).split([n_a, n_b])
            fake_a, f_of_a = self.F(torch.cat([b, a])).split([n_b, n_a])
        else:
            fake_b, fake_a = self.G(a), self.F(b)
            g_of_b = f_of_a = None
        return fake_b, fake_a, self.F(fake_b), self.G(fake_a), g_of_b, f_of_a


class Discriminators(nn.Module):
    """D_A and D_B as one module: one call scores real and fake rows of both domains."""

    def __init__(self, D_A: nn.Module, D_B: nn.Module):
        super().__init__()
        self.D_A, self.D_B = D_A, D_B

    def forward(self, real_a: torch.Tensor, fake_a: torch.Tensor, real_b: torch.Tensor,
                fake_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """D_A(real_a), D_A(fake_a), D_B(real_b), D_B(fake_b)."""
        on_a = self.D_A(torch.cat([real_a, fake_a])).split([len(real_a), len(fake_a)])
        on_b = self.D_B(torch.cat([real_b, fake_b])).split([len(real_b), len(fake_b)])
        return (*on_a, *on_b)


class ImagePool:
    """The paper's buffer of past fakes (Shrivastava et al.): the discriminator sees a mix of the
    newest fakes and ones generated a while ago, so it cannot chase only the generator's latest
    move and the two do not oscillate. Each new fake enters the pool while it has room; once full,
    with probability ½ the fake replaces a random stored one and the stored one is shown instead.
    """

    def __init__(self, size: int, generator: torch.Generator):
        self.size = size
        self.generator = generator
        self.images: list[torch.Tensor] = []

    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return fakes
        out = []
        for fake in fakes.detach():
            if len(self.images) < self.size:
                self.images.append(fake.clone())
                out.append(fake)
            elif torch.rand((), generator=self.generator) < 0.5:
                i = int(torch.randint(self.size, (), generator=self.generator))
                out.append(self.images[i].clone())
                self.images[i] = fake.clone()
            else:
                out.append(fake)
        return torch.stack(out)

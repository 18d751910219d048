"""CycleGAN's objective (Zhu et al., 2017), term by term.

With generators G: A→B, F: B→A and discriminators D_A (real A vs F(b)), D_B (real B vs G(a)):

* least-squares adversarial loss (Mao et al., LSGAN) — the discriminator regresses real to 1 and
  fake to 0, the generator pushes its fakes to 1:

      L_D(D) = ½ · ( E_real[(D(x) − 1)²] + E_fake[D(x̃)²] )
      L_adv(G) = E_a[(D_B(G(a)) − 1)²]            (and likewise F against D_A)

  The squares penalise fakes by their distance to the decision boundary even when they are
  already classified "real", so gradients do not vanish as they do with the saturating log loss;
  the ½ on the discriminator slows it relative to the generators, as in the paper's code.
* cycle consistency, the L1 distance of a round trip back to its start:

      L_cyc = E_a ‖F(G(a)) − a‖₁ + E_b ‖G(F(b)) − b‖₁

  It is what makes the translation *unpaired* but not arbitrary: G must keep enough of a to
  recover it, so it cannot map every digit to the same plausible bold digit.
* identity, the L1 distance of a generator from the identity on its own target domain:

      L_id = E_b ‖G(b) − b‖₁ + E_a ‖F(a) − a‖₁

  It discourages changes the translation does not need (tone, position).

The generators minimise L_adv(G) + L_adv(F) + λ·L_cyc + λ_id·L_id. ‖·‖₁ is taken as the mean
absolute difference per element (``nn.L1Loss``), so λ does not depend on the image size.
"""

from __future__ import annotations

import torch


def lsgan_discriminator_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
    """½ (mean (D(real) − 1)² + mean D(fake)²)."""
    return 0.5 * (torch.mean((real_pred - 1.0) ** 2) + torch.mean(fake_pred ** 2))


def lsgan_generator_loss(fake_pred: torch.Tensor) -> torch.Tensor:
    """mean (D(fake) − 1)²: the generator wants its fakes judged real."""
    return torch.mean((fake_pred - 1.0) ** 2)


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per element."""
    return torch.mean(torch.abs(x - y))


def cycle_loss(a: torch.Tensor, a_cycled: torch.Tensor, b: torch.Tensor, b_cycled: torch.Tensor) -> torch.Tensor:
    """‖F(G(a)) − a‖₁ + ‖G(F(b)) − b‖₁ with ``a_cycled`` = F(G(a)), ``b_cycled`` = G(F(b))."""
    return l1(a_cycled, a) + l1(b_cycled, b)


def identity_loss(a: torch.Tensor, f_of_a: torch.Tensor, b: torch.Tensor, g_of_b: torch.Tensor) -> torch.Tensor:
    """‖G(b) − b‖₁ + ‖F(a) − a‖₁: each generator leaves its own target domain alone."""
    return l1(g_of_b, b) + l1(f_of_a, a)

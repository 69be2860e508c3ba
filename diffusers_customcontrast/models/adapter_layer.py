"""The trainable parts that live beside one cross-attention layer of the UNet."""

from __future__ import annotations

import torch
from torch import nn


class SubjectLocationHead(nn.Module):
    """Timesteps location: where the subject is in this layer's feature map at this step (paper figure 4).

    Our choice (the paper gives no equations): the affinity of each query pixel for the subject is the log-sum-exp
    of its visual cross-attention logits over the subject's tokens, averaged over heads. Standardised over the
    pixels of each image, it passes through an affine map and a sigmoid; the gain and bias come from the layer's
    pooled S+ tokens, which depend on the timestep and the layer, so the map is timestep-conditioned.
    """

    def __init__(self, cross_attention_dim: int, init_bias: float = 3.0) -> None:
        super().__init__()
        self.affine = nn.Linear(cross_attention_dim, 2)
        # Start as a flat, nearly open gate (sigmoid(3) = 0.95) so a visual branch warm-started from IP-Adapter
        # behaves as IP-Adapter until the location loss teaches the head where to look.
        nn.init.zeros_(self.affine.weight)
        with torch.no_grad():
            self.affine.bias.copy_(torch.tensor([1.0, init_bias]))

    def forward(self, affinity: torch.Tensor, s_plus: torch.Tensor) -> torch.Tensor:
        """``affinity`` ``[B, N]`` and the layer's S+ tokens ``[B, Ns, D]`` -> location map ``[B, N]`` in (0, 1)."""
        gain, bias = self.affine(s_plus.mean(dim=1)).float().unbind(dim=-1)
        affinity = affinity.float()
        mean = affinity.mean(dim=1, keepdim=True)
        std = affinity.std(dim=1, keepdim=True, correction=0)
        standardised = (affinity - mean) / (std + 1e-5)
        return torch.sigmoid(gain[:, None] * standardised + bias[:, None])


class CustomContrastLayer(nn.Module):
    """Visual cross-attention projections (the shapes of IP-Adapter's) and the location head of one layer."""

    def __init__(self, cross_attention_dim: int, hidden_size: int, location_init_bias: float = 3.0) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.location = SubjectLocationHead(cross_attention_dim, location_init_bias)

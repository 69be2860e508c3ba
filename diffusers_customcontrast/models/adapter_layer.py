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
        # Gain 1 and bias init_bias whatever the tokens: the map starts as sigmoid(standardised affinity + 3), which
        # over a feature map spans about (0.45, 1), not a flat gate. The location loss trains it from there; keeping
        # the visual branch open meanwhile is the LocationGate's job.
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


class LocationGate(nn.Module):
    """How much the location map gates the layer's visual branch: ``1 - s (1 - m)`` with a learned strength ``s``.

    ``s`` is clamped to [0, 1]: at 0 the gate is exactly open (1 everywhere, the visual branch reaches every pixel
    as IP-Adapter's does), at 1 it is the map itself. An adapter converted from IP-Adapter starts at 0, so it computes
    what IP-Adapter computes, and the diffusion loss opens the gate from there; a new adapter starts at 1.
    """

    def __init__(self, init_strength: float = 1.0) -> None:
        super().__init__()
        self.strength = nn.Parameter(torch.tensor(float(init_strength)))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Location maps in (0, 1) -> the gate, of the same shape, in [maps, 1]."""
        # Clamped in the forward pass only: a plain clamp has no gradient outside [0, 1], so a gate pushed below 0 by
        # its first update (it starts on that edge) could never open again.
        strength = self.strength + (self.strength.clamp(0.0, 1.0) - self.strength).detach()
        strength = strength.to(maps.dtype)
        return 1.0 - strength * (1.0 - maps)


class CustomContrastLayer(nn.Module):
    """Visual cross-attention projections (the shapes of IP-Adapter's), the location head and gate of one layer."""

    def __init__(
        self,
        cross_attention_dim: int,
        hidden_size: int,
        location_init_bias: float = 3.0,
        location_gate_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.location = SubjectLocationHead(cross_attention_dim, location_init_bias)
        self.location_gate = LocationGate(location_gate_init)

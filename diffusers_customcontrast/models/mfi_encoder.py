"""The Multimodal Feature Injection (MFI) encoder of CustomContrast (paper figure 2a, b).

A visual Q-Former (IP-Adapter-Plus's Resampler with a CLS query; for an adapter that reads CLIP's pooled image
embedding, plain IP-Adapter's linear projection) summarises the reference image into visual tokens
``V = [V_cls; V_1..V_Nv]``. A textual Q-Former,
conditioned on the diffusion timestep ``t`` and the cross-attention layer ``l``, produces the layer's S+ tokens
``s_l(t)`` and a textual CLS token. The TV fusion lets the textual tokens attend over the visual tokens; its attention
weights ``A_l(t)`` re-weight the visual tokens, added to them, into the tokens that the layer's visual
cross-attention reads.

The work splits in two: :meth:`MFIEncoder.encode_image` depends on the image alone, :meth:`MFIEncoder.encode_step`
on the timestep, and runs all layers in one call. ``forward`` runs both, or only the second for an image context the
caller computed once for a generation. Call the module itself: accelerate's offload hooks load a module's weights
when its ``forward`` runs, and the learned queries belong to this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .config import CustomContrastAdapterConfig
from .qformer import (
    Float32Linear,
    KeysValues,
    LinearVisualProjection,
    QFormer,
    VisualQFormer,
    float32_region,
    normalise_heads,
    split_heads,
)


@dataclass
class ImageContext:
    """What the encoder derives from the reference image alone (independent of timestep and layer)."""

    visual_tokens: torch.Tensor  # [B, Nv, D_ctx]: the visual Q-Former's tokens at the UNet's context width, before
    # its output LayerNorm (which the TV fusion applies, with its own part added before or after it)
    visual_cls: torch.Tensor  # [B, H]
    textual_kv: KeysValues  # per textual Q-Former block, [B, heads, P, d] keys and values of the image
    fusion_keys: torch.Tensor  # [B, heads, Nv, d]
    fusion_values: torch.Tensor  # [B, heads, Nv, d]


@dataclass
class SubjectTokens:
    """The encoder's output for one batch of reference images at one timestep per row."""

    s_plus: torch.Tensor  # [B, L, Ns, D_ctx]: appended to the text context of layer l
    visual: torch.Tensor  # [B, L, Nv, D_ctx]: read by layer l's visual cross-attention
    visual_cls: torch.Tensor  # [B, H]
    textual_cls: torch.Tensor  # [B, L, H]


# The largest RMS (over its channels) of what a "capped" TV fusion (every adapter saved before the config field)
# adds to a visual token after its LayerNorm. It adds ``proj`` of up to ``Nv`` times the visual Q-Former's unnormalised hidden
# states to tokens of RMS ~1, a sum with no bound: with weights of the size training gives it reached 200 to 2e5
# (issue 29), beyond float16 (max 65 504) at the larger ones. Above this RMS the added part is scaled down to it;
# below, it is unchanged to the bit. 16 is 3.6x the largest the shipped world adapter adds (4.4). A cap bounds the
# size but not the sensitivity: tokens 16x the size of the LayerNorm-ed ones saturate the layers' visual attention, so
# that rounding the weights to float16 moved images by 0.25 to 0.8. The "normalised" fusion removes both.
MAX_FUSION_RMS = 16.0


def cap_rms(tokens: torch.Tensor, max_rms: float = MAX_FUSION_RMS) -> torch.Tensor:
    """``tokens`` scaled down, each to an RMS of ``max_rms`` over its last dimension, where it is above; unchanged
    (multiplied by exactly 1) elsewhere. No Python branch on the values: no device -> host sync."""
    # max_rms / max(rms, max_rms): exactly 1 below the cap (16 / sqrt(16^2)), and no infinite derivative at 0.
    mean_square = tokens.pow(2).mean(dim=-1, keepdim=True)
    return tokens * (max_rms / mean_square.clamp_min(max_rms**2).sqrt())


class FusionProjection(Float32Linear):
    """The TV fusion's ``proj`` (a Linear ``H -> D_ctx``, same parameters), applied to the re-weighted visual tokens
    without forming them.

    ``proj(concat_h(w_hlj V_j^h)) = sum_h w_hlj (W_h V_j^h) + b``, with ``W_h`` the columns of head ``h``: each visual
    token is projected once per head (``Nv x H x D_ctx`` per image), and each layer only mixes those projections with
    its weights (``L x Nv x heads x D_ctx``), instead of projecting ``L x Nv`` re-weighted tokens
    (``L x Nv x H x D_ctx``): 7 GFLOP less per SDXL step (issue 29). The same sum in another order: equal to the
    Linear up to float32 rounding. Float32 like :class:`Float32Linear`, in this module's own ``forward``.
    """

    def forward(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``weights`` ``[B, heads, L, Nv]`` and per-head ``values`` ``[B, heads, Nv, d]`` -> ``[B, L, Nv, D_ctx]``."""
        heads, head_dim = values.shape[1], values.shape[3]
        per_head = self.weight.float().view(self.out_features, heads, head_dim)
        with float32_region(values):
            projected = torch.einsum("bhjd,chd->bhjc", values.float(), per_head)  # [B, heads, Nv, D_ctx]
            out = torch.einsum("bhlj,bhjc->bljc", weights.float(), projected)
        return out + self.bias.float() if self.bias is not None else out


class TVFusion(nn.Module):
    """Textual tokens query the visual tokens; the attention weights re-weight the visual tokens themselves.

    ``A_l(t) = softmax(s_l W_q (V W_k)^T / sqrt(d))`` per head. Each visual token is weighed by the attention it
    receives from the layer's textual tokens (per head, scaled so that the weights average 1), and the re-weighted
    tokens are added to the visual Q-Former's output through ``proj``. Where they are added is the config's
    ``tv_fusion_residual`` (both our choice; the paper gives no equation)::

        normalised:  v_l(t)_j = norm(U_j + proj(Nv * mean_i A_l(t)_ij * V_j)),  with RMS-normalised queries and keys
        capped:      v_l(t)_j = norm(U_j) + cap(proj(Nv * mean_i A_l(t)_ij * V_j))

    with ``U`` the visual Q-Former's tokens before its output LayerNorm ``norm`` (``V_out = norm(U)``, what the
    layers of an IP-Adapter-Plus read). A residual rather than ``proj(A V)`` alone: with ``proj`` zero-initialised
    (``identity_init``) every layer reads exactly ``V_out``, which is what a converted IP-Adapter-Plus needs, and
    training adds the layer- and timestep-dependent part from there.

    Half precision (issue 29): the fusion and ``norm`` run in float32 (a few million multiply-adds per step).
    "normalised" keeps every layer's tokens LayerNorm-ed as IP-Adapter-Plus's are, whatever ``proj`` adds, and bounds
    the fusion's attention logits by ``sqrt(d)`` (QK-norm), so that neither the tokens' size nor a near-argmax
    softmax makes the images hang on the weights' last bits. "capped" (:func:`cap_rms`, at :data:`MAX_FUSION_RMS`)
    only bounds the size.
    """

    def __init__(
        self, hidden_size: int, cross_attention_dim: int, num_heads: int, identity_init: bool, normalised: bool
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.normalised = normalised
        self.to_q = Float32Linear(hidden_size, hidden_size)
        self.to_k = Float32Linear(hidden_size, hidden_size)
        self.proj = FusionProjection(hidden_size, cross_attention_dim)
        if identity_init:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        heads = split_heads(projected, self.num_heads)
        return normalise_heads(heads) if self.normalised else heads

    def keys_values(self, visual_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head float32 keys and values ``[B, heads, Nv, d]`` of the visual tokens ``[B, Nv, H]``."""
        return self._heads(self.to_k(visual_hidden)), split_heads(visual_hidden.float(), self.num_heads)

    def forward(
        self,
        textual: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visual_tokens: torch.Tensor,
        norm: nn.Module,
    ) -> torch.Tensor:
        """``textual`` ``[B, L, Ns, H]``, the visual tokens before ``norm`` ``[B, Nv, D_ctx]`` -> fused
        ``[B, L, Nv, D_ctx]``, in the visual tokens' dtype."""
        batch, layers, tokens, hidden = textual.shape
        num_visual = keys.shape[2]
        keys, values = keys.float(), values.float()  # an image context made before this module's fix is half
        q = self._heads(self.to_q(textual.reshape(batch, layers * tokens, hidden)))
        with float32_region(q):
            attention = (q @ keys.transpose(-1, -2) * keys.shape[-1] ** -0.5).softmax(dim=-1)
        weights = attention.unflatten(2, (layers, tokens)).mean(dim=3) * num_visual  # [B, heads, L, Nv]
        added = self.proj(weights, values)  # proj(Nv * mean_i A_ij * V_j)
        if self.normalised:
            fused = norm(visual_tokens[:, None].float() + added)
        else:
            fused = norm(visual_tokens)[:, None] + cap_rms(added)
        return fused.to(visual_tokens.dtype)


class MFIEncoder(nn.Module):
    """Visual Q-Former, timestep- and layer-conditioned textual Q-Former, and TV fusion.

    Its shape is that of ``config`` (a :class:`CustomContrastAdapterConfig`): ``image_embed_dim`` wide features in,
    per layer ``num_textual_tokens`` S+ tokens and ``num_visual_tokens`` fused visual tokens of width
    ``cross_attention_dim`` out.
    """

    def __init__(self, config: CustomContrastAdapterConfig) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_heads
        self.num_layers = config.num_layers
        self.num_textual_tokens = config.num_textual_tokens
        context = config.cross_attention_dim

        # One attribute name for both projections: the weights of every adapter saved so far are under it.
        if config.visual_projection == "linear":
            self.visual_qformer = LinearVisualProjection(
                config.image_embed_dim, hidden, config.num_visual_tokens, context
            )
        else:
            self.visual_qformer = VisualQFormer(
                config.image_embed_dim,
                hidden,
                heads,
                config.visual_depth,
                config.num_visual_tokens,
                context,
                config.mlp_ratio,
                config.qformer_qk_norm,
            )

        self.image_proj = nn.Sequential(
            nn.LayerNorm(config.image_embed_dim), nn.Linear(config.image_embed_dim, hidden)
        )
        self.textual_queries = nn.Parameter(torch.randn(config.num_textual_tokens + 1, hidden) * 0.02)
        self.time_proj = Timesteps(config.timestep_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(config.timestep_embed_dim, hidden)
        self.layer_embedding = nn.Embedding(config.num_layers, hidden)
        self.textual_qformer = QFormer(hidden, heads, config.textual_depth, config.mlp_ratio, config.qformer_qk_norm)

        self.s_plus_proj = nn.Sequential(nn.Linear(hidden, context), nn.LayerNorm(context))
        self.tv_fusion = TVFusion(
            hidden,
            context,
            heads,
            identity_init=config.tv_fusion_init == "identity",
            normalised=config.tv_fusion_residual == "normalised",
        )

    def encode_image(self, image_features: torch.Tensor) -> ImageContext:
        """The timestep-independent part: visual Q-Former and the image keys of the textual Q-Former and fusion."""
        visual_cls, visual_hidden, visual_tokens = self.visual_qformer(image_features)
        fusion_keys, fusion_values = self.tv_fusion.keys_values(visual_hidden)
        return ImageContext(
            visual_tokens=visual_tokens,
            visual_cls=visual_cls,
            textual_kv=self.textual_qformer.image_keys_values(self.image_proj(image_features)),
            fusion_keys=fusion_keys,
            fusion_values=fusion_values,
        )

    def encode_step(self, image: ImageContext, timesteps: torch.Tensor) -> SubjectTokens:
        """The (t, l)-dependent part for every layer at once; ``timesteps`` holds one value per batch row."""
        batch = image.visual_cls.shape[0]
        dtype = image.visual_cls.dtype
        timesteps = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.reshape(batch)
        time = self.time_embedding(self.time_proj(timesteps).to(dtype))
        layers = self.layer_embedding(torch.arange(self.num_layers, device=time.device)).to(dtype)
        queries = self.textual_queries + time[:, None, None, :] + layers[None, :, None, :]
        textual = self.textual_qformer(queries, image.textual_kv)

        ns = self.num_textual_tokens
        return SubjectTokens(
            s_plus=self.s_plus_proj(textual[:, :, :ns]),
            visual=self.tv_fusion(
                textual[:, :, :ns],
                image.fusion_keys,
                image.fusion_values,
                image.visual_tokens,
                self.visual_qformer.output_norm,
            ),
            visual_cls=image.visual_cls,
            textual_cls=textual[:, :, ns],
        )

    def forward(
        self, image_features: torch.Tensor, timesteps: torch.Tensor, image_context: ImageContext | None = None
    ) -> SubjectTokens:
        """Encode ``[B, P, image_embed_dim]`` image features at ``timesteps`` (``[B]`` or a scalar).

        ``image_context``, their :meth:`encode_image` computed beforehand (once for a whole generation), skips that
        half of the work.
        """
        image = image_context if image_context is not None else self.encode_image(image_features)
        return self.encode_step(image, timesteps)

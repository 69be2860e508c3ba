"""The two Q-Formers of the MFI encoder.

:class:`QFormer` (the textual one) has image-side keys and values that can be computed once and reused.
transformers' ``Blip2QFormerModel`` would fit the maths, but it projects ``encoder_hidden_states`` into keys and
values inside every call. The textual Q-Former runs once per (timestep, layer): with it, each denoising step would
re-project the same image features for every one of the UNet's 16 (SD1.5) or 70 (SDXL) cross-attention layers.
Here the image side is projected once per image (:meth:`QFormer.image_keys_values`) and any number of query groups
(one per layer) attend to it in a single batched call.

:class:`VisualQFormer` is IP-Adapter-Plus's Resampler (a Perceiver) with one more query, the visual CLS, so that
an IP-Adapter-Plus checkpoint converts into it key for key and computes the same tokens. diffusers' own
``IPAdapterPlusImageProjection`` has no CLS query and no way to expose the pre-projection tokens that the TV fusion
and the contrastive loss read, hence a module of our own with the same maths.

:class:`LinearVisualProjection` takes the visual Q-Former's place for an adapter that reads CLIP's pooled image
embedding: plain IP-Adapter's projection (diffusers' ``ImageProjection``), key for key, with the same three outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, C]`` -> ``[B, heads, N, C // heads]``."""
    batch, length, channels = x.shape
    return x.view(batch, length, num_heads, channels // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, d]`` -> ``[B, N, heads * d]``."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


HALF_DTYPES = (torch.float16, torch.bfloat16)
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def float32_region(tensor: torch.Tensor) -> torch.autocast:
    """A region where autocast (mixed-precision training) does not lower float32 operations on ``tensor``'s device
    back to half precision: what is computed in float32 here stays float32. Outside autocast it changes nothing."""
    device = tensor.device.type
    return torch.autocast(device if device in AUTOCAST_DEVICES else "cpu", enabled=False)


def normalise_heads(heads: torch.Tensor) -> torch.Tensor:
    """Parameter-free QK-norm: every head's queries or keys ``[..., d]`` scaled to RMS 1 (in float32: their squares
    outgrow float16), so that attention logits stay within ``sqrt(d)`` whatever the weights. Without it, weights of
    the size training makes turn softmaxes into near-argmaxes that the weights' last bits decide: rounding them to
    float16, with float32 arithmetic, moved the images as much as float16 did (issue 29)."""
    return F.rms_norm(heads.float(), (heads.shape[-1],)).to(heads.dtype)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention``, in float32 for half-precision inputs, cast back.

    diffusers' ``upcast_attention`` / ``upcast_softmax``: the Q-Formers' queries and keys grow to ~100 with trained
    weights, so their logits reach the thousands, where a half-precision logit is off by 0.5 to 8 and the softmax by as
    much; four blocks of that moved the visual tokens by 20 % (issue 29). In float32 the operation is unchanged.
    """
    if query.dtype in HALF_DTYPES:
        with float32_region(query):
            return F.scaled_dot_product_attention(query.float(), key.float(), value.float()).to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value)


class Float32Linear(nn.Linear):
    """A Linear computed in float32 whatever its weights' and input's dtype; its output stays float32.

    For the products that can outgrow half precision (the TV fusion's re-weighted tokens, up to ``Nv`` times the
    visual Q-Former's unnormalised hidden states): the weights are read in this module's own ``forward``, so
    accelerate's offload hooks still load them. The parameters are a Linear's (same state-dict keys).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's argument name)
        bias = self.bias.float() if self.bias is not None else None
        with float32_region(input):
            return F.linear(input.float(), self.weight.float(), bias)


class Float32LayerNorm(nn.LayerNorm):
    """A LayerNorm computed in float32 whatever its parameters' and input's dtype; its output stays float32.

    The visual tokens' output norm: the TV fusion adds to its input sums that can outgrow half precision (issue 29).
    Like :class:`Float32Linear`, it reads its weights in its own ``forward`` (offload hooks load them) and keeps a
    LayerNorm's state-dict keys.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.LayerNorm's argument name)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with float32_region(input):
            return F.layer_norm(input.float(), self.normalized_shape, weight, bias, self.eps)


class QFormerBlock(nn.Module):
    """Pre-norm block: self-attention within each query group, cross-attention to the image, MLP; with ``qk_norm``
    the queries and keys of both attentions are RMS-normalised per head (:func:`normalise_heads`)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.norm_self = nn.LayerNorm(hidden_size)
        self.to_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.self_out = nn.Linear(hidden_size, hidden_size)
        self.norm_cross = nn.LayerNorm(hidden_size)
        self.to_q_cross = nn.Linear(hidden_size, hidden_size)
        self.to_kv_image = nn.Linear(hidden_size, 2 * hidden_size)
        self.cross_out = nn.Linear(hidden_size, hidden_size)
        self.norm_mlp = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, int(hidden_size * mlp_ratio)),
            nn.GELU(),
            nn.Linear(int(hidden_size * mlp_ratio), hidden_size),
        )

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        """Queries or keys ``[B, N, C]`` per head, normalised with ``qk_norm``."""
        heads = split_heads(projected, self.num_heads)
        return normalise_heads(heads) if self.qk_norm else heads

    def image_keys_values(self, image_context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project ``[B, P, C]`` image tokens to per-head keys and values ``[B, heads, P, d]``."""
        key, value = self.to_kv_image(image_context).chunk(2, dim=-1)
        return self._heads(key), split_heads(value, self.num_heads)

    def forward(self, queries: torch.Tensor, image_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``queries`` is ``[B, G, Q, C]``: G groups of Q queries per image, each group self-attending alone."""
        batch, groups, num_queries, channels = queries.shape

        grouped = self.norm_self(queries).reshape(batch * groups, num_queries, channels)
        q, k, v = self.to_qkv(grouped).chunk(3, dim=-1)
        attended = merge_heads(attention(self._heads(q), self._heads(k), split_heads(v, self.num_heads)))
        queries = queries + self.self_out(attended).view(batch, groups, num_queries, channels)

        # All groups of one image attend to that image's keys in one call: no copy of the keys per group.
        flat = self.norm_cross(queries).reshape(batch, groups * num_queries, channels)
        attended = merge_heads(attention(self._heads(self.to_q_cross(flat)), *image_kv))
        queries = queries + self.cross_out(attended).view(batch, groups, num_queries, channels)

        return queries + self.mlp(self.norm_mlp(queries))


class QFormer(nn.Module):
    """A stack of :class:`QFormerBlock` with a final LayerNorm."""

    def __init__(
        self, hidden_size: int, num_heads: int, depth: int, mlp_ratio: float = 4.0, qk_norm: bool = False
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([QFormerBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden_size)

    def image_keys_values(self, image_context: torch.Tensor) -> KeysValues:
        """Keys and values of the image tokens for every block; depends on the image only."""
        return [block.image_keys_values(image_context) for block in self.blocks]

    def forward(self, queries: torch.Tensor, image_kv: KeysValues) -> torch.Tensor:
        """Run ``[B, G, Q, C]`` query groups against precomputed image keys and values."""
        for block, kv in zip(self.blocks, image_kv, strict=True):
            queries = block(queries, kv)
        return self.norm_out(queries)


class PerceiverBlock(nn.Module):
    """One block of IP-Adapter-Plus's Resampler: the queries attend to the image tokens and the latent queries at
    once (one softmax over both), then an MLP; pre-norm, residual.

    The parameter names are those of the original checkpoints (``norm1`` for the image, ``norm2`` for the queries,
    ``to_q``, ``to_kv``, ``to_out``, and ``ff`` = LayerNorm, Linear, GELU, Linear), all projections without bias as
    there. The first query (the visual CLS) reads the others but is not read by them: the latent queries compute
    exactly what the Resampler's do, unless ``qk_norm`` RMS-normalises queries and keys per head
    (:func:`normalise_heads`; the Resampler has no such norm).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.to_q = nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_kv = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.to_out = nn.Linear(hidden_size, hidden_size, bias=False)
        inner = int(hidden_size * mlp_ratio)
        self.ff = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, inner, bias=False),
            nn.GELU(),
            nn.Linear(inner, hidden_size, bias=False),
        )

    def forward(self, image: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``image`` ``[B, P, C]`` (after ``proj_in``) and ``queries`` ``[B, 1 + Nv, C]`` (CLS first) -> new queries."""
        normed = self.norm2(queries)
        keys, values = self.to_kv(torch.cat([self.norm1(image), normed[:, 1:]], dim=1)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.num_heads) for t in (self.to_q(normed), keys, values))
        if self.qk_norm:
            q, k = normalise_heads(q), normalise_heads(k)
        queries = queries + self.to_out(merge_heads(attention(q, k, v)))
        return queries + self.ff(queries)


class VisualQFormer(nn.Module):
    """The visual Q-Former: IP-Adapter-Plus's Resampler plus a visual CLS query.

    ``queries`` row 0 is the CLS, rows 1.. are the Resampler's ``latents``; ``proj_in``, ``blocks`` (its ``layers``),
    ``proj_out`` and ``norm_out`` are its modules of the same names. Returns the CLS ``[B, H]`` (for the contrastive
    loss), the visual tokens at the Q-Former's width ``[B, Nv, H]`` (what the TV fusion weighs) and the visual
    tokens at the UNet's context width ``[B, Nv, D_ctx]`` before ``norm_out`` (:attr:`output_norm`): the Resampler's
    output is ``norm_out`` of them, and the TV fusion adds its part on either side of that norm.
    """

    def __init__(
        self,
        image_embed_dim: int,
        hidden_size: int,
        num_heads: int,
        depth: int,
        num_tokens: int,
        cross_attention_dim: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1 + num_tokens, hidden_size) / hidden_size**0.5)
        self.proj_in = nn.Linear(image_embed_dim, hidden_size)
        self.blocks = nn.ModuleList([PerceiverBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.proj_out = nn.Linear(hidden_size, cross_attention_dim)
        self.norm_out = Float32LayerNorm(cross_attention_dim)

    @property
    def output_norm(self) -> Float32LayerNorm:
        return self.norm_out

    def forward(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.proj_in(image_features)
        queries = self.queries.expand(image.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(image, queries)
        tokens = queries[:, 1:]
        return queries[:, 0], tokens, self.proj_out(tokens)


class LinearVisualProjection(nn.Module):
    """Plain IP-Adapter's image projection in the visual Q-Former's place: ``[B, T, D_img]`` pooled image embeddings
    (one token per image; several are averaged) -> the visual CLS, the visual tokens at the Q-Former's width and at
    the UNet's context width, as :class:`VisualQFormer` returns them.

    ``proj`` and ``norm`` are IP-Adapter's modules of the same names (diffusers' ``ImageProjection``: a Linear to
    ``num_tokens * cross_attention_dim``, split into tokens, then a LayerNorm); the tokens they make are what the
    layers read. ``cls_proj`` (the CLS, for the contrastive loss) and ``to_hidden`` (the tokens the TV fusion weighs)
    are CustomContrast's own and do not change those tokens.
    """

    def __init__(self, image_embed_dim: int, hidden_size: int, num_tokens: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = Float32LayerNorm(cross_attention_dim)
        self.cls_proj = nn.Linear(image_embed_dim, hidden_size)
        self.to_hidden = nn.Linear(cross_attention_dim, hidden_size)

    def forward(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds = image_features.mean(dim=1)  # one token: exactly the image's embedding
        tokens = self.proj(embeds).unflatten(-1, (self.num_tokens, -1))
        normed = self.norm(tokens).to(tokens.dtype)
        return self.cls_proj(embeds), self.to_hidden(normed), tokens

    @property
    def output_norm(self) -> Float32LayerNorm:
        return self.norm

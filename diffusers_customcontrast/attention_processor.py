"""``CustomContrastAttnProcessor2_0``: CustomContrast's injection into one cross-attention layer.

For each subject image ``k`` of a call, with its region ``g_k`` (the user's mask, or the layer's timestep location
map ``m_l(t)``)::

    out = Attn_text(h; [c; s_l(t)_1 .. s_l(t)_n], S+ logits of subject k + log(beta_l g_k))
          + sum_k lambda_l g_k Attn_vis(h; v_l(t)_k)

The S+ tokens join the prompt's context in the frozen text cross-attention (so LoRA on ``to_k``/``to_v`` still
applies); the log-bias multiplies their attention weight at each pixel by ``beta_l`` and by the subject's presence
there, so a subject's S+ tokens reach its own region only (none at all where its mask is 0). The visual branch reads
the fused visual tokens through the adapter's ``to_k_ip``/``to_v_ip``, gated by the same region. The processor keeps
nothing between calls: the call's tokens, options and record arrive with the call
(:class:`~diffusers_customcontrast.conditioning.SubjectConditioning`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from torch import nn

from .conditioning import LayerScale, SubjectConditioning, SubjectOptions, layer_setting
from .models.adapter_layer import CustomContrastLayer
from .models.qformer import merge_heads, split_heads


def per_subject_scales(scale: LayerScale, num_subjects: int) -> list[float]:
    """``lambda_l`` of each subject image: one float for all, or a list with one per subject."""
    scales = scale if isinstance(scale, list) else [scale] * num_subjects
    if len(scales) != num_subjects:
        raise ValueError(f"Got {len(scales)} per-subject scales for {num_subjects} subject images.")
    return scales


class _SubjectScale(list):
    """``[lambda_l]`` of a processor with CustomContrast alone, as diffusers' ``set_ip_adapter_scale`` sees its
    ``scale``: assigning an item replaces the attached adapter's settings, since the processor keeps no copy."""

    def __init__(self, processor: CustomContrastAttnProcessor2_0) -> None:
        super().__init__([processor.subject_scale])
        self._processor = processor

    def __setitem__(self, index: int, value: LayerScale) -> None:
        super().__setitem__(index, value)
        self._processor.set_subject_scale(self[0])


class CustomContrastAttnProcessor2_0(IPAdapterAttnProcessor2_0):
    r"""Attention processor of one cross-attention layer with a CustomContrast adapter.

    A subclass of diffusers' ``IPAdapterAttnProcessor2_0``, so diffusers treats it as an IP-Adapter processor
    (``unload_ip_adapter`` removes it, ``ip_adapter_masks`` reach it). ``to_k_ip``, ``to_v_ip`` and ``num_tokens`` are
    CustomContrast's own. Beside diffusers' IP-Adapters (loaded first: entries ``0 .. entry_index - 1`` of the call's
    image embeddings), ``ip_adapter`` is the layer's own IP-Adapter processor, kept whole: this processor computes their
    branches as it does, and ``scale``, what diffusers' ``set_ip_adapter_scale`` sets, is that processor's list, so
    that each adapter's setter sets its own and unloading CustomContrast leaves them as last set.

    The processor holds no scale of its own: each call's ``lambda_l`` and ``beta_l`` arrive with the call (its
    :class:`~diffusers_customcontrast.conditioning.SubjectConditioning` options, which the UNet's pre-hook fills in from
    the attached adapter's settings). ``subject_scale``, ``s_plus_scale`` and, alone, ``scale`` read those settings;
    assigning ``scale[0]``, as ``set_ip_adapter_scale`` does, replaces them with this layer's value changed.

    Args:
        layer: the adapter's modules for this layer (shared, not copied).
        layer_index: index of this layer among the UNet's cross-attention layers.
        num_s_plus_tokens: S+ tokens per subject and layer (the adapter's ``num_textual_tokens``).
        entry_index: position of the adapter's entry in the call's image embeddings (load order).
        ip_adapter: the layer's processor of diffusers' IP-Adapters loaded before, if any.
        attached: the attached adapter whose settings this processor reports (anything with a ``settings``
            :class:`~diffusers_customcontrast.conditioning.SubjectOptions`); ``None`` for a processor used on its own,
            which acts with scale 1 unless its calls say otherwise.
    """

    def __init__(
        self,
        layer: CustomContrastLayer,
        layer_index: int,
        num_s_plus_tokens: int,
        entry_index: int = 0,
        ip_adapter: IPAdapterAttnProcessor2_0 | None = None,
        attached: object | None = None,
    ) -> None:
        # Not the parent's __init__: it builds projections of its own and sets `scale`, which here is a view (below).
        nn.Module.__init__(self)
        self.hidden_size = layer.to_k_ip.out_features
        self.cross_attention_dim = layer.to_k_ip.in_features
        self.num_tokens = [num_s_plus_tokens]
        self.to_k_ip = nn.ModuleList([layer.to_k_ip])
        self.to_v_ip = nn.ModuleList([layer.to_v_ip])
        self.location = layer.location
        self.location_gate = layer.location_gate
        self.ip_adapter = ip_adapter
        self.attached = attached
        self.layer_index = layer_index
        self.entry_index = entry_index
        # The same index as a tensor: torch.compile guards on int attributes, so slicing with the int would make
        # diffusers' regional compilation (one graph for every transformer block) recompile for each layer.
        self.register_buffer("layer_index_tensor", torch.tensor([layer_index]), persistent=False)

    @property
    def subject_scale(self) -> LayerScale:
        """CustomContrast's ``lambda_l`` on this layer (a float, or one per subject image)."""
        return layer_setting(self._settings, "scale", self.layer_index)

    @property
    def s_plus_scale(self) -> float:
        """CustomContrast's ``beta_l`` on this layer."""
        return layer_setting(self._settings, "s_plus_scale", self.layer_index)

    @property
    def _settings(self) -> SubjectOptions | None:
        return self.attached.settings if self.attached is not None else None

    @property
    def scale(self) -> list:
        """What diffusers' ``set_ip_adapter_scale`` sets: the IP-Adapters' scales beside them, else ``[subject_scale]``."""
        return self.ip_adapter.scale if self.ip_adapter is not None else _SubjectScale(self)

    def set_subject_scale(self, value: LayerScale) -> None:
        """Replace the attached adapter's settings with this layer's ``lambda_l`` set to ``value``."""
        if self.attached is None:
            raise ValueError("This processor is not attached to an adapter: pass the scale in the call's options.")
        settings = self.attached.settings
        scales = list(settings.scale)
        scales[self.layer_index] = value
        self.attached.settings = dataclasses.replace(settings, scale=tuple(scales))

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: list | None = None,
    ) -> torch.Tensor:
        conditioning = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, image_entries = encoder_hidden_states
            conditioning = image_entries[self.entry_index]

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        query = split_heads(attn.to_q(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)

        s_plus = s_plus_bias = visual = None
        if conditioning is not None and conditioning.active and encoder_hidden_states is not None:
            masks = ip_adapter_masks[self.entry_index] if ip_adapter_masks is not None else None
            s_plus, s_plus_bias, visual = self._subject_branches(attn, query, conditioning, masks)

        hidden_states = self._text_attention(
            attn, query, hidden_states, encoder_hidden_states, attention_mask, s_plus, s_plus_bias
        )
        if conditioning is not None and self.ip_adapter is not None:
            hidden_states = self._ip_adapter_attention(
                attn, query, hidden_states, image_entries[: self.entry_index], ip_adapter_masks
            )
        if visual is not None:
            hidden_states = hidden_states + visual

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _subject_branches(
        self, attn: Attention, query: torch.Tensor, conditioning: SubjectConditioning, masks: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """This layer's S+ context ``[B, n Ns, D]``, its log-bias ``[B, 1, N, n Ns]`` and the gated visual branch
        ``[B, N, C]`` (each ``None`` when switched off)."""
        scale, s_plus_scale = conditioning.layer_scales(self.layer_index)
        s_plus, visual_tokens = conditioning.layer_tokens(self.layer_index_tensor)
        batch, num_subjects, num_tokens = s_plus.shape[:3]
        num_visual_tokens = visual_tokens.shape[2]
        scales = per_subject_scales(scale, num_subjects)
        use_visual, use_s_plus = any(s != 0 for s in scales), s_plus_scale != 0
        if not (use_visual or use_s_plus):
            return None, None, None

        num_pixels = query.shape[2]
        logits = None
        if use_visual or masks is None:
            key = self._split_subject_heads(self.to_k_ip[0](visual_tokens.to(query.dtype)), attn.heads)
            logits = self._visual_logits(attn, query, key).unflatten(-1, (num_subjects, num_visual_tokens))
        if masks is not None:
            region = self._mask_regions(masks, batch, num_pixels).to(query.device)
        else:
            affinity = torch.logsumexp(logits, dim=-1).mean(dim=1)  # [B, N, n]
            maps = self.location(affinity.transpose(1, 2).flatten(0, 1), s_plus.flatten(0, 1))  # [B n, N]
            maps = maps.unflatten(0, (batch, num_subjects))
            conditioning.record_location(self.layer_index, maps)
            region = self.location_gate(maps).transpose(1, 2)

        s_plus_context = s_plus_bias = visual = None
        if use_s_plus:
            s_plus_context = s_plus.flatten(1, 2)
            # log(beta g): each S+ token's attention weight at a pixel times beta and the subject's presence there.
            # A gate that underflows to 0 is raised to the smallest normal number: log(0) = -inf gives the same
            # attention (weight 0) but a NaN gradient (0 * inf), which in training poisons every weight at once.
            gate = (region * s_plus_scale).clamp_min(torch.finfo(region.dtype).tiny)
            s_plus_bias = torch.log(gate).repeat_interleave(num_tokens, dim=-1)[:, None]
        if use_visual:
            value = self._split_subject_heads(self.to_v_ip[0](visual_tokens.to(query.dtype)), attn.heads)
            # lambda g, [B, N, n]; one scale for every subject (the usual case) multiplies without a host -> device copy
            same = all(s == scales[0] for s in scales)
            weights = region * (scales[0] if same else torch.tensor(scales, dtype=region.dtype, device=region.device))
            # Gating the probabilities is gating each subject's output (the product is linear), in one product for
            # all subjects and without a pass over the [B, N, C] output per subject.
            probs = logits.softmax(dim=-1) * weights[:, None, :, :, None]
            visual = merge_heads(probs.flatten(-2).to(value.dtype) @ value).to(query.dtype)
        return s_plus_context, s_plus_bias, visual

    def _ip_adapter_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        hidden_states: torch.Tensor,
        entries: list[torch.Tensor],
        masks: list | None,
    ) -> torch.Tensor:
        """``hidden_states`` plus the branches of diffusers' IP-Adapters, computed as ``IPAdapterAttnProcessor2_0``
        computes them (the same operations in the same order, so the same numbers)."""
        ip = self.ip_adapter
        masks = masks[: len(entries)] if masks is not None else [None] * len(entries)
        for features, scale, to_k_ip, to_v_ip, mask in zip(entries, ip.scale, ip.to_k_ip, ip.to_v_ip, masks):
            if all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0:
                continue
            if mask is None:
                hidden_states = hidden_states + scale * self._image_attention(attn, query, features, to_k_ip, to_v_ip)
                continue
            scales = scale if isinstance(scale, list) else [scale] * mask.shape[1]
            for index in range(mask.shape[1]):
                output = self._image_attention(attn, query, features[:, index], to_k_ip, to_v_ip)
                region = IPAdapterMaskProcessor.downsample(mask[:, index], *output.shape)
                hidden_states = hidden_states + scales[index] * (
                    output * region.to(dtype=query.dtype, device=query.device)
                )
        return hidden_states

    @staticmethod
    def _image_attention(
        attn: Attention, query: torch.Tensor, features: torch.Tensor, to_k: nn.Module, to_v: nn.Module
    ) -> torch.Tensor:
        """``[B, N, C]`` attention of the pixels over one IP-Adapter's image tokens (``[B, (n,) T, D]``)."""
        key, value = (split_heads(project(features).flatten(1, -2), attn.heads) for project in (to_k, to_v))
        return merge_heads(F.scaled_dot_product_attention(query, key, value)).to(query.dtype)

    @staticmethod
    def _split_subject_heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
        """``[B, n, Ns, C]`` -> ``[B, heads, n Ns, C / heads]``: every subject's tokens as keys of one attention."""
        return split_heads(tokens.flatten(1, 2), heads)

    @staticmethod
    def _visual_logits(attn: Attention, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``[B, heads, N, n Ns]`` float32 logits of the pixels on the subjects' visual tokens.

        The query is scaled before the product, as ``scaled_dot_product_attention`` does, and the product is float32
        whatever the model's dtype (diffusers' ``upcast_attention``): these logits feed a softmax and the location
        head's logsumexp, and with trained weights they reach the hundreds, where half precision is off by 0.25 to 4.
        """
        return (query.float() * attn.scale) @ key.float().transpose(-1, -2)

    @staticmethod
    def _mask_regions(masks: torch.Tensor, batch: int, num_pixels: int) -> torch.Tensor:
        """The user's ``[1 or B, n, H, W]`` masks at this layer's resolution, ``[B, N, n]`` in [0, 1].

        Resized as diffusers resizes IP-Adapter masks (bicubic, which over- and undershoots at edges: clamped).
        """
        regions = [IPAdapterMaskProcessor.downsample(masks[:, k], batch, num_pixels, 1) for k in range(masks.shape[1])]
        return torch.cat(regions, dim=-1).float().clamp(0, 1)

    def _text_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        s_plus: torch.Tensor | None,
        s_plus_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """The frozen text cross-attention over ``[c; S+]`` (or plain self-/cross-attention)."""
        batch_size = query.shape[0]
        if context is None:
            context = hidden_states
        length = context.shape[1]
        if s_plus is not None:
            context = torch.cat([context, s_plus.to(context.dtype)], dim=1)
        if attn.norm_cross and context is not hidden_states:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if s_plus_bias is not None:
            prompt_bias = attention_mask if attention_mask is not None else query.new_zeros(1, 1, 1, length)
            heads = prompt_bias.shape[1]
            prompt_bias = prompt_bias.expand(batch_size, heads, s_plus_bias.shape[2], length)
            attention_mask = torch.cat([prompt_bias, s_plus_bias.to(query.dtype).expand(-1, heads, -1, -1)], dim=-1)

        key = split_heads(attn.to_k(context), attn.heads)
        value = split_heads(attn.to_v(context), attn.heads)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        return merge_heads(hidden_states).to(query.dtype)

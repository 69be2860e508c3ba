"""``CustomContrastAttnProcessor2_0``: CustomContrast's injection into one cross-attention layer.

``out = Attn_text(h; [c; s_l(t)]) + lambda_l * m_l(t) * Attn_vis(h; v_l(t))``

The S+ tokens join the prompt's context in the frozen text cross-attention (so LoRA on ``to_k``/``to_v`` still applies),
their attention logits shifted by ``log(beta_l)``; the visual branch reads the fused visual tokens through its own
``to_k_ip``/``to_v_ip`` and is gated by the layer's timestep location map or by a user mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from torch import nn

from .models.adapter_layer import CustomContrastLayer
from .models.qformer import merge_heads, split_heads
from .recording import SubjectRecorder

Scale = float | list[float]


def _per_subject(scale: Scale, num_subjects: int) -> list[float]:
    scales = scale if isinstance(scale, list) else [scale] * num_subjects
    if len(scales) != num_subjects:
        raise ValueError(f"Got {len(scales)} per-subject scales for {num_subjects} subject images.")
    return scales


class CustomContrastAttnProcessor2_0(IPAdapterAttnProcessor2_0):
    r"""Attention processor of one cross-attention layer with a CustomContrast adapter.

    A subclass of diffusers' ``IPAdapterAttnProcessor2_0``, so diffusers treats it as an IP-Adapter processor
    (``set_ip_adapter_scale`` sets ``scale``, ``unload_ip_adapter`` removes it, ``ip_adapter_masks`` reach it).

    Args:
        layer: the adapter's modules for this layer (shared, not copied).
        layer_index: index of this layer among the UNet's cross-attention layers.
        num_s_plus_tokens: S+ tokens per subject in the packed tokens the image projection produces.
        scale: ``lambda_l``, weight of the visual branch (a float, or one float per subject image).
        s_plus_scale: ``beta_l``, multiplies the S+ tokens' attention weights (0 removes them).
        recorder: where location maps are stored while recording (training, inspection).
    """

    def __init__(
        self,
        layer: CustomContrastLayer,
        layer_index: int,
        num_s_plus_tokens: int,
        scale: Scale = 1.0,
        s_plus_scale: float = 1.0,
        recorder: SubjectRecorder | None = None,
    ) -> None:
        # The parent's constructor would allocate projections of its own; these are the adapter's, shared.
        nn.Module.__init__(self)
        self.hidden_size = layer.to_k_ip.out_features
        self.cross_attention_dim = layer.to_k_ip.in_features
        self.num_tokens = [num_s_plus_tokens]
        self.scale = [scale]
        self.s_plus_scale = s_plus_scale
        self.layer_index = layer_index
        # The same index as a tensor: torch.compile guards on int attributes, so slicing with the int would make
        # diffusers' regional compilation (one graph for every transformer block) recompile for each layer.
        self.register_buffer("layer_index_tensor", torch.tensor([layer_index]), persistent=False)
        self.num_s_plus_tokens = num_s_plus_tokens
        self.to_k_ip = nn.ModuleList([layer.to_k_ip])
        self.to_v_ip = nn.ModuleList([layer.to_v_ip])
        self.location = layer.location
        self.recorder = recorder if recorder is not None else SubjectRecorder()
        self._checked_masks: tuple[torch.Tensor, int] | None = None  # the last mask tensor whose values passed

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | list | None = None,
    ) -> torch.Tensor:
        subject_tokens = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, (subject_tokens, *_) = encoder_hidden_states

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
        query = attn.to_q(hidden_states)

        s_plus = visual = None
        if subject_tokens is not None and encoder_hidden_states is not None:
            s_plus, visual = self._layer_tokens(subject_tokens, batch_size)

        hidden_states = self._text_attention(attn, query, hidden_states, encoder_hidden_states, attention_mask, s_plus)
        if visual is not None:
            hidden_states = self._visual_attention(attn, query, hidden_states, visual, s_plus, ip_adapter_masks)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _layer_tokens(self, subject_tokens: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's S+ and visual tokens ``[B, n, Ns, D]`` from the packed ``[B_img, n, L, 2 Ns, D]`` tokens."""
        index = self.layer_index_tensor.to(subject_tokens.device)
        tokens = subject_tokens.index_select(2, index).squeeze(2)
        image_batch = tokens.shape[0]
        if image_batch != batch_size:
            if batch_size % image_batch:
                raise ValueError(
                    f"The subject embeddings have batch size {image_batch}, which does not divide the prompt batch "
                    f"size {batch_size}: pass one subject image per prompt, or one for all prompts."
                )
            # Pipelines order rows as [negative prompts..., positive prompts...] and the image rows the same way,
            # so each image row serves a contiguous run of prompt rows.
            tokens = tokens.repeat_interleave(batch_size // image_batch, dim=0)
        ns = self.num_s_plus_tokens
        return tokens[:, :, :ns], tokens[:, :, ns:]

    def _text_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        s_plus: torch.Tensor | None,
    ) -> torch.Tensor:
        """The frozen text cross-attention over ``[c; s_l(t)]`` (or plain self-/cross-attention)."""
        batch_size = query.shape[0]
        extra = 0
        if context is None:
            context = hidden_states
        else:
            if s_plus is not None and self.s_plus_scale != 0:
                extra = s_plus.shape[1] * s_plus.shape[2]
                context = torch.cat([context, s_plus.reshape(batch_size, extra, -1).to(context.dtype)], dim=1)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
        attention_mask = self._attention_bias(attn, attention_mask, query, context.shape[1], extra)

        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        return hidden_states.to(query.dtype)

    def _attention_bias(
        self, attn: Attention, attention_mask: torch.Tensor | None, query: torch.Tensor, length: int, extra: int
    ) -> torch.Tensor | None:
        """The user's attention mask over the prompt, extended by the ``log(beta_l)`` bias of the S+ tokens."""
        batch_size = query.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length - extra, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if extra == 0 or (attention_mask is None and self.s_plus_scale == 1):
            return attention_mask
        if attention_mask is None:
            attention_mask = query.new_zeros(1, 1, 1, length - extra)
        bias = attention_mask.new_full((*attention_mask.shape[:-1], extra), math.log(self.s_plus_scale))
        return torch.cat([attention_mask, bias], dim=-1)

    def _visual_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        hidden_states: torch.Tensor,
        visual: torch.Tensor,
        s_plus: torch.Tensor,
        ip_adapter_masks: torch.Tensor | list | None,
    ) -> torch.Tensor:
        """Add ``lambda_l * m_l(t) * Attn_vis(h; v_l(t))`` for each subject image."""
        batch_size, num_pixels, channels = hidden_states.shape
        num_subjects = visual.shape[1]
        scales = _per_subject(self.scale[0], num_subjects)
        if all(s == 0 for s in scales):
            return hidden_states
        masks = self._subject_masks(ip_adapter_masks, num_subjects)
        head_dim = channels // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        maps = []
        for index, subject_scale in enumerate(scales):
            if subject_scale == 0:
                continue
            tokens = visual[:, index].to(query.dtype)
            key = split_heads(self.to_k_ip[0](tokens), attn.heads)
            value = split_heads(self.to_v_ip[0](tokens), attn.heads)
            logits = (query @ key.transpose(-1, -2)).float() * attn.scale
            attended = merge_heads(logits.softmax(dim=-1).to(query.dtype) @ value)
            if masks is not None:
                gate = IPAdapterMaskProcessor.downsample(masks[:, index], batch_size, num_pixels, channels)
                gate = gate.to(dtype=query.dtype, device=query.device)
            else:
                location = self.location(torch.logsumexp(logits, dim=-1).mean(dim=1), s_plus[:, index])
                maps.append(location)
                gate = location.to(query.dtype)[:, :, None]
            hidden_states = hidden_states + subject_scale * attended * gate
        if len(maps) == num_subjects and self.recorder.active:
            self.recorder.record_location(self.layer_index, torch.stack(maps, dim=1))
        return hidden_states

    def _subject_masks(self, ip_adapter_masks: torch.Tensor | list | None, num_subjects: int) -> torch.Tensor | None:
        """The user's masks for this adapter as ``[1, n, H, W]``, validated."""
        if ip_adapter_masks is None:
            return None
        masks = ip_adapter_masks[0] if isinstance(ip_adapter_masks, list) else ip_adapter_masks
        if masks is None:
            return None
        if not isinstance(masks, torch.Tensor) or masks.ndim != 4 or masks.shape[:2] != (1, num_subjects):
            shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ValueError(
                f"ip_adapter_masks must hold one [1, num_subjects, height, width] tensor with num_subjects = "
                f"{num_subjects} (from IPAdapterMaskProcessor().preprocess), got {shape}."
            )
        # The values are checked once per mask tensor (not per layer and step): a NaN or 0..255 mask would scale
        # the subject's branch without a word.
        checked = self._checked_masks
        if masks.device.type != "meta" and (
            checked is None or checked[0] is not masks or checked[1] != masks._version
        ):
            if not torch.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1:
                raise ValueError(
                    "ip_adapter_masks values must lie in [0, 1] (IPAdapterMaskProcessor().preprocess gives 0 or 1), "
                    f"got [{masks.min().item():.4g}, {masks.max().item():.4g}]."
                )
            self._checked_masks = (masks, masks._version)
        return masks

"""Training losses of CustomContrast (multilevel contrastive learning, docs/method.md).

Every function is pure and dtype/device agnostic: losses are computed in float32 whatever the input dtype
and returned as float32 scalars, so they behave the same under fp16 / bf16 mixed precision.

- ``L_diff``: :func:`diffusion_loss` of the model output against :func:`diffusion_target`, optionally
  weighted with :func:`min_snr_weights`.
- ``L_CSCL``: :func:`cscl_loss`, crossmodal semantic contrastive learning between visual and textual CLS.
- ``L_MACL``: :func:`macl_loss`, multiscale appearance contrastive learning of per-layer S+ tokens, with appearance
  scaling of the negatives' similarities (:func:`appearance_factors`, the paper's reading) or of the targets
  (:func:`appearance_targets`).
- ``L_loc``: :func:`location_loss`, BCE of the per-layer subject location maps against the subject mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "APPEARANCE_SCALINGS",
    "DEFAULT_LOSS_WEIGHT",
    "appearance_factors",
    "appearance_targets",
    "cscl_loss",
    "diffusion_loss",
    "diffusion_target",
    "info_nce",
    "location_loss",
    "macl_loss",
    "min_snr_weights",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
APPEARANCE_SCALINGS = ("soft_targets", "similarity", "none")
"""How :func:`macl_loss` uses the appearance similarity ``S``: as soft targets (our first reading), as factors on the
negatives' similarities (the paper's words), or not at all (plain InfoNCE). See ``docs/method.md``."""
DEFAULT_LOSS_WEIGHT = 0.03
"""Default weight of L_CSCL, L_MACL and L_loc beside L_diff (our choice, the paper gives none): the best of 0.03, 0.1
and 0.3 on the synthetic world benchmark (``docs/world_benchmark.md``), where higher weights cost controllability."""
# Cap of the CSCL inverse temperature, as in CLIP: keeps the logits (and the loss) from blowing up.
MAX_LOGIT_SCALE = 100.0
# Probability clamp of the location BCE; representable next to 1 in float32, unlike 1e-8.
_BCE_EPS = 1e-6


def _prediction_type(noise_scheduler) -> str:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unsupported prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}.")
    return prediction_type


def diffusion_target(noise_scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """Regression target of the denoiser for the scheduler's ``prediction_type``.

    With ``x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps`` (``a_t = alphas_cumprod[t]``) the target is
    ``eps`` for ``"epsilon"``, ``v = sqrt(a_t) * eps - sqrt(1 - a_t) * x_0`` for ``"v_prediction"`` and
    ``x_0`` for ``"sample"``.

    Args:
        noise_scheduler: a diffusers scheduler (``config.prediction_type``, ``get_velocity``).
        latents: clean latents ``x_0``.
        noise: the noise ``eps`` added to them.
        timesteps: ``[B]`` integer timesteps.

    Raises:
        ValueError: for any other ``prediction_type``.
    """
    prediction_type = _prediction_type(noise_scheduler)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return latents


def min_snr_weights(noise_scheduler, timesteps: Tensor, snr_gamma: float) -> Tensor:
    """Per-sample Min-SNR-gamma loss weights (Hang et al. 2023), float32 ``[B]``.

    With ``snr_t = a_t / (1 - a_t)`` and ``a_t = alphas_cumprod[t]``, the weight is
    ``min(snr_t, gamma) / snr_t`` for ``"epsilon"``, ``min(snr_t, gamma) / (snr_t + 1)`` for
    ``"v_prediction"`` and ``min(snr_t, gamma)`` for ``"sample"``: every prediction type is then weighted
    like an ``x_0`` loss clipped at ``gamma``.
    """
    if snr_gamma <= 0:
        raise ValueError(f"snr_gamma must be positive, got {snr_gamma}.")
    prediction_type = _prediction_type(noise_scheduler)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    if prediction_type == "epsilon":
        # min(snr, gamma) / snr written as min(gamma / snr, 1): stays 1 instead of 0/0 at zero terminal SNR.
        return (snr_gamma / snr).clamp(max=1.0)
    clipped = snr.clamp(max=snr_gamma)
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped


def diffusion_loss(model_pred: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted MSE: ``mean_b( w_b * mean_{c,h,w} (pred_b - target_b)^2 )``, in float32.

    Args:
        model_pred: denoiser output ``[B, ...]``.
        target: :func:`diffusion_target`, same shape.
        weights: optional per-sample weights ``[B]`` (e.g. :func:`min_snr_weights`); ``None`` means 1.
    """
    if model_pred.shape != target.shape:
        raise ValueError(
            f"model_pred and target must have the same shape, got {tuple(model_pred.shape)} and {tuple(target.shape)}."
        )
    per_sample = (model_pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if weights is not None:
        if weights.shape != per_sample.shape:
            raise ValueError(f"expected weights of shape [{per_sample.shape[0]}], got {tuple(weights.shape)}.")
        per_sample = per_sample * weights.float()
    return per_sample.mean()


def info_nce(logits: Tensor, targets: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over a batch of paired items, in float32.

    ``logits[..., b, b']`` scores anchor ``b`` of one side against candidate ``b'`` of the other; row ``b`` of
    ``targets`` (``[B, B]``, rows summing to 1) is the target distribution of anchor ``b`` over its candidates,
    by default one-hot on ``b' = b`` (the positive). The loss is

        ``(CE(logits, targets) + CE(logits^T, targets)) / 2``

    averaged over anchors and leading dimensions: both sides take a turn as anchor, with the same targets.
    With ``B = 1`` there are no negatives and the loss is exactly 0.
    """
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"expected logits of shape [..., B, B], got {tuple(logits.shape)}.")
    logits = logits.float()
    size = logits.shape[-1]
    if targets is None:
        targets = torch.eye(size, device=logits.device)
    elif targets.shape != (size, size):
        raise ValueError(f"expected targets of shape [{size}, {size}], got {tuple(targets.shape)}.")
    targets = targets.float().expand_as(logits).reshape(-1, size)
    forward = F.cross_entropy(logits.reshape(-1, size), targets)
    backward = F.cross_entropy(logits.mT.reshape(-1, size), targets)
    return (forward + backward) / 2


def _check_shape(name: str, tensor: Tensor, ndim: int, layout: str) -> None:
    if tensor.ndim != ndim:
        raise ValueError(f"expected {name} of shape {layout}, got {tuple(tensor.shape)}.")


def cscl_loss(visual_cls: Tensor, textual_cls: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Crossmodal Semantic Contrastive Learning (``L_CSCL``): CLIP-style symmetric InfoNCE.

    ``logits[b, b'] = min(exp(logit_scale), 100) * cos(V_cls[b], T_cls[b'])`` and the loss is
    :func:`info_nce` of it: each subject's visual CLS is matched to its own textual CLS against the other
    subjects of the batch, and vice versa. A batch of one has no negatives, so the loss is 0.

    Args:
        visual_cls: ``V_cls``, ``[B, D]``.
        textual_cls: ``T_cls``, ``[B, D]``.
        logit_scale: learnable log inverse temperature (a scalar parameter, or a float). Above ``log(100)``
            the scale is clamped and receives no gradient, as in CLIP.
    """
    _check_shape("visual_cls", visual_cls, 2, "[B, D]")
    if textual_cls.shape != visual_cls.shape:
        raise ValueError(
            f"expected textual_cls of shape {tuple(visual_cls.shape)} like visual_cls, got {tuple(textual_cls.shape)}."
        )
    scale = torch.as_tensor(logit_scale, device=visual_cls.device).float().exp().clamp(max=MAX_LOGIT_SCALE)
    visual = F.normalize(visual_cls.float(), dim=-1)
    textual = F.normalize(textual_cls.float(), dim=-1)
    return info_nce(scale * visual @ textual.T)


def _check_appearance_similarity(appearance_similarity: Tensor, batch_size: int | None = None) -> None:
    """``S`` must be square, and ``[batch_size, batch_size]`` when the batch size is given."""
    shape = tuple(appearance_similarity.shape)
    square = len(shape) == 2 and shape[0] == shape[1]
    if not square or (batch_size is not None and shape[0] != batch_size):
        layout = "[B, B]" if batch_size is None else f"[{batch_size}, {batch_size}]"
        raise ValueError(f"expected appearance_similarity of shape {layout}, got {shape}.")


def appearance_factors(appearance_similarity: Tensor) -> Tensor:
    """MACL's appearance scaling factors as the paper states them (3.3.2: "The appearance scaling factor is S").

    ``factors[b, b'] = clamp(S[b, b'], 0, 1)`` for the negatives ``b' != b`` and exactly 1 on the diagonal (the
    positive pair is not scaled; the diagonal of ``S`` is ignored). :func:`macl_loss` multiplies each cosine of the
    logit matrix by its factor. Cosines below 0 are clamped to 0 because a negative factor would flip the sign of
    that negative's logit, and the loss would then pull a different subject towards the reference; 0 means "no
    push" and is as unlike as a factor can say. The upper clamp only absorbs rounding above 1.

    Args:
        appearance_similarity: ``S``, ``[B, B]``, cosine similarities of frozen CLIP image embeddings of the
            segmented subjects.
    """
    _check_appearance_similarity(appearance_similarity)
    eye = torch.eye(appearance_similarity.shape[0], dtype=torch.bool, device=appearance_similarity.device)
    return torch.where(eye, 1.0, appearance_similarity.float().clamp(0.0, 1.0))


def appearance_targets(appearance_similarity: Tensor, appearance_temperature: float) -> Tensor:
    """Soft MACL targets scaled by real appearance similarity (``appearance_scaling="soft_targets"``, our choice).

    Row ``b`` is ``softmax_{b'}(z[b, b'] / tau_a)`` with ``z[b, b] = 1`` (the positive; the diagonal of
    ``S`` is ignored) and ``z[b, b'] = S[b, b']`` for the negatives, used as they are (a negative cosine only
    lowers that negative's mass further). A negative that looks like subject ``b`` gets more target mass, so it is
    pushed away less than a different-looking one; one that looks identical (``S = 1``) gets as much mass as the
    positive. As ``tau_a -> 0`` the targets become one-hot on the positive (``tau_a == 0`` returns exactly the
    identity) and MACL becomes plain InfoNCE.

    Args:
        appearance_similarity: ``S``, ``[B, B]``, e.g. cosine similarities (<= 1) of frozen CLIP image
            embeddings of the segmented subjects.
        appearance_temperature: ``tau_a >= 0``.
    """
    _check_appearance_similarity(appearance_similarity)
    if appearance_temperature < 0:
        raise ValueError(f"appearance_temperature must be >= 0, got {appearance_temperature}.")
    eye = torch.eye(appearance_similarity.shape[0], dtype=torch.bool, device=appearance_similarity.device)
    if appearance_temperature == 0:
        return eye.float()
    # Shifted by the positive's 1 (softmax is shift invariant): the positive's logit is 0 and the others are
    # <= 0, so a tiny tau_a gives -inf rather than inf - inf = NaN.
    shifted = torch.where(eye, 0.0, appearance_similarity.float() - 1.0)
    return (shifted / appearance_temperature).softmax(dim=-1)


def macl_loss(
    reference_tokens: Tensor,
    positive_tokens: Tensor,
    appearance_similarity: Tensor | None = None,
    temperature: float = 0.1,
    appearance_temperature: float = 0.05,
    appearance_scaling: str = "similarity",
) -> Tensor:
    """Multiscale Appearance Contrastive Learning (``L_MACL``) in the S+ space.

    The reference frame's tokens of subject ``b`` must pick out the positive frame of the same subject among the
    batch's subjects, and vice versa. Each cross-attention layer ``l`` has its own token set, so layers are
    contrasted separately: with ``C_l[b, b'] = cos(ref[b, l], pos[b', l])``, ``L_MACL = mean_l`` of, by
    ``appearance_scaling``:

    - ``"similarity"`` (the paper's reading): ``info_nce(appearance_factors(S) * C_l / tau)``, each negative's
      cosine multiplied by its appearance factor ``clamp(S[b, b'], 0, 1)`` (the positive's by 1). ``S`` all ones
      is plain InfoNCE; a negative with factor 0 has logit 0 whatever the tokens, so it is not pushed at all, and
      the push on a negative's cosine grows with how much it looks like the reference.
    - ``"soft_targets"``: ``info_nce(C_l / tau, appearance_targets(S, tau_a))``, cross-entropy against
      ``softmax([1, S[b, b']...] / tau_a)``: a similar-looking negative is pushed less.
    - ``"none"``: ``info_nce(C_l / tau)``, plain InfoNCE; ``S`` is not read.

    Without ``appearance_similarity`` every mode is plain InfoNCE. ``S`` is a constant: it comes from a frozen
    encoder and receives no gradient.

    Args:
        reference_tokens: pooled S+ tokens of the reference frame ``j``, ``[B, L, D]``.
        positive_tokens: pooled S+ tokens of the positive frame ``i`` (same subject), ``[B, L, D]``.
        appearance_similarity: optional ``S``, ``[B, B]``, symmetric.
        temperature: contrastive temperature ``tau > 0``.
        appearance_temperature: ``tau_a`` of the soft targets (``"soft_targets"`` only).
        appearance_scaling: one of :data:`APPEARANCE_SCALINGS`.
    """
    _check_shape("reference_tokens", reference_tokens, 3, "[B, L, D]")
    if positive_tokens.shape != reference_tokens.shape:
        raise ValueError(
            f"expected positive_tokens of shape {tuple(reference_tokens.shape)}, got {tuple(positive_tokens.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if appearance_scaling not in APPEARANCE_SCALINGS:
        raise ValueError(
            f"appearance_scaling must be one of {', '.join(map(repr, APPEARANCE_SCALINGS))}, "
            f"got {appearance_scaling!r}."
        )
    if appearance_similarity is not None:
        _check_appearance_similarity(appearance_similarity, reference_tokens.shape[0])
    reference = F.normalize(reference_tokens.float(), dim=-1)
    positive = F.normalize(positive_tokens.float(), dim=-1)
    cosines = torch.einsum("bld,cld->lbc", reference, positive)
    targets = None
    if appearance_similarity is not None and appearance_scaling == "similarity":
        # S * cos / tau: both are factors of the logit, so it does not matter where tau divides in.
        cosines = cosines * appearance_factors(appearance_similarity.detach())
    elif appearance_similarity is not None and appearance_scaling == "soft_targets":
        targets = appearance_targets(appearance_similarity.detach(), appearance_temperature)
    return info_nce(cosines / temperature, targets)


def location_loss(location_maps: list[Tensor], masks: Tensor, valid: Tensor | None = None) -> Tensor:
    """Subject location loss (``L_loc``): BCE of each layer's location map against the resized subject mask.

    ``L_loc = mean_l mean_{b valid, n, y, x} BCE(m_l[b, n, y, x], M_l[b, n, y, x])`` where ``M_l`` is the
    target frame's mask area-averaged to layer ``l``'s resolution, i.e. the subject's coverage fraction of
    each cell (a soft target at the subject's border). Probabilities are clamped to ``[1e-6, 1 - 1e-6]``.

    Args:
        location_maps: one map per layer with values in (0, 1), ``[B, h_l, w_l]`` or ``[B, N, h_l, w_l]``
            (``N`` subjects, matching ``masks``).
        masks: target frame's subject masks in {0, 1}, ``[B, N, H, W]`` (``N = 1`` for one subject).
        valid: optional ``[B]`` bool, frames that have a mask; the others contribute nothing. With no valid
            frame the loss is a zero that is still connected to the maps, so ``backward()`` works.
    """
    if not location_maps:
        raise ValueError("location_maps must hold at least one layer's map.")
    _check_shape("masks", masks, 4, "[B, N, H, W]")
    batch_size, num_subjects = masks.shape[:2]
    maps = [m.unsqueeze(1) if m.ndim == 3 else m for m in location_maps]
    for index, m in enumerate(maps):
        if m.ndim != 4 or m.shape[:2] != (batch_size, num_subjects):
            raise ValueError(
                f"expected location_maps[{index}] of shape [{batch_size}, h, w] or "
                f"[{batch_size}, {num_subjects}, h, w] to match masks {tuple(masks.shape)}, got {tuple(location_maps[index].shape)}."
            )
    if valid is not None:
        if valid.shape != (batch_size,):
            raise ValueError(f"expected valid of shape [{batch_size}], got {tuple(valid.shape)}.")
        valid = valid.to(device=masks.device, dtype=torch.bool)
        if not valid.any():
            return sum(m.float().sum() for m in maps) * 0.0
        # Select rather than zero-weight: a placeholder mask of an invalid frame must not reach the graph.
        masks = masks[valid]
        maps = [m[valid.to(m.device)] for m in maps]
    masks = masks.float()
    losses = []
    for m in maps:
        target = F.adaptive_avg_pool2d(masks, m.shape[-2:]).to(m.device)
        prob = m.float().clamp(_BCE_EPS, 1.0 - _BCE_EPS)
        # Written out instead of F.binary_cross_entropy, which autocast refuses to run.
        losses.append(-(target * prob.log() + (1.0 - target) * (1.0 - prob).log()).mean())
    return torch.stack(losses).mean()

"""Known-value tests of diffusers_customcontrast.losses (values worked out by hand in the comments)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffusers_customcontrast.losses import (
    appearance_targets,
    cscl_loss,
    diffusion_loss,
    diffusion_target,
    info_nce,
    location_loss,
    macl_loss,
    min_snr_weights,
)


def make_scheduler(prediction_type: str) -> DDPMScheduler:
    # betas 0.36, 0.4375 -> alphas 0.64, 0.5625 -> alphas_cumprod 0.64, 0.36:
    # sqrt(a) = 0.8, 0.6 and sqrt(1 - a) = 0.6, 0.8; snr = a / (1 - a) = 16/9, 9/16.
    return DDPMScheduler(num_train_timesteps=2, trained_betas=[0.36, 0.4375], prediction_type=prediction_type)


def log1pexp(x: float) -> float:
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- diffusion


def test_diffusion_target_per_prediction_type():
    latents = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    noise = torch.tensor([[0.5, -1.0], [2.0, 1.0]])
    timesteps = torch.tensor([0, 1])
    assert torch.equal(diffusion_target(make_scheduler("epsilon"), latents, noise, timesteps), noise)
    assert torch.equal(diffusion_target(make_scheduler("sample"), latents, noise, timesteps), latents)
    # v = sqrt(a) * noise - sqrt(1 - a) * x0: row 0 with (0.8, 0.6), row 1 with (0.6, 0.8).
    expected_v = torch.tensor(
        [
            [0.8 * 0.5 - 0.6 * 1.0, 0.8 * -1.0 - 0.6 * 2.0],
            [0.6 * 2.0 - 0.8 * 3.0, 0.6 * 1.0 - 0.8 * -1.0],
        ]
    )
    v = diffusion_target(make_scheduler("v_prediction"), latents, noise, timesteps)
    torch.testing.assert_close(v, expected_v)


def test_unknown_prediction_type_is_named():
    scheduler = make_scheduler("flow_prediction")
    with pytest.raises(ValueError, match="flow_prediction.*epsilon, v_prediction, sample"):
        diffusion_target(scheduler, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="flow_prediction"):
        min_snr_weights(scheduler, torch.tensor([0]), 5.0)


@pytest.mark.parametrize(
    ("prediction_type", "expected"),
    [
        # gamma = 1, snr = (16/9, 9/16): min(snr, 1) = (1, 9/16).
        ("epsilon", [9 / 16, 1.0]),  # min / snr
        ("v_prediction", [9 / 25, 9 / 25]),  # min / (snr + 1): 1 / (25/9) and (9/16) / (25/16)
        ("sample", [1.0, 9 / 16]),  # min
    ],
)
def test_min_snr_weights(prediction_type, expected):
    weights = min_snr_weights(make_scheduler(prediction_type), torch.tensor([0, 1]), snr_gamma=1.0)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.tensor(expected))


def test_min_snr_epsilon_weight_at_zero_terminal_snr_is_one():
    scheduler = SimpleNamespace(
        config=SimpleNamespace(prediction_type="epsilon"), alphas_cumprod=torch.tensor([0.64, 0.0])
    )
    torch.testing.assert_close(min_snr_weights(scheduler, torch.tensor([1]), 5.0), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="snr_gamma"):
        min_snr_weights(scheduler, torch.tensor([1]), 0.0)


def test_diffusion_loss_with_weights():
    pred = torch.zeros(2, 1, 2, dtype=torch.bfloat16, requires_grad=True)
    target = torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]], dtype=torch.bfloat16)
    # per-sample MSE: (1 + 9) / 2 = 5 and (4 + 4) / 2 = 4.
    loss = diffusion_loss(pred, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(4.5))
    weighted = diffusion_loss(pred, target, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(weighted, torch.tensor((5 * 1.0 + 4 * 0.5) / 2))
    weighted.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_diffusion_loss_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        diffusion_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="weights of shape \\[2\\]"):
        diffusion_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


# ---------------------------------------------------------------- CSCL


def test_cscl_identity_pairs():
    # cos = I, scale 2: each row's logits are (2, 0) with the positive at 2 -> CE = log(1 + e^-2) both ways.
    eye = torch.eye(2)
    loss = cscl_loss(3.0 * eye, eye, math.log(2.0))
    torch.testing.assert_close(loss, torch.tensor(log1pexp(-2.0)))


def test_cscl_is_symmetric():
    visual = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    textual = torch.eye(2)
    s = 2.0
    # cos = [[1, 0], [1, 0]], logits = s * cos.
    # visual -> textual rows: (s, 0) target 0: log(1 + e^-s); (s, 0) target 1: log(1 + e^s).
    # textual -> visual rows (cos^T = [[1, 1], [0, 0]]): both log 2.
    expected = ((log1pexp(-s) + log1pexp(s)) / 2 + math.log(2.0)) / 2
    for a, b in ((visual, textual), (textual, visual)):
        torch.testing.assert_close(cscl_loss(a, b, math.log(s)), torch.tensor(expected))


def test_cscl_clamps_scale_at_100():
    visual = torch.eye(2)
    textual = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    # cos = [[0.6, 0.8], [0.8, 0.6]]; exp(10) clamps to 100: each row CE = log(1 + e^{100 * (0.8 - 0.6)}).
    torch.testing.assert_close(cscl_loss(visual, textual, 10.0), torch.tensor(log1pexp(20.0)))


def test_cscl_gradients_and_single_sample():
    visual = torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True)
    textual = torch.randn(3, 4, requires_grad=True)
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = cscl_loss(visual, textual, logit_scale)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    for tensor in (visual, textual, logit_scale):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0

    # One subject: no negatives, so the loss is exactly 0 and backward still works.
    single = cscl_loss(visual[:1], textual[:1], logit_scale)
    assert single.item() == 0.0
    single.backward()


def test_cscl_bad_shapes():
    with pytest.raises(ValueError, match="visual_cls of shape \\[B, D\\]"):
        cscl_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 0.0)
    with pytest.raises(ValueError, match="textual_cls"):
        cscl_loss(torch.zeros(2, 4), torch.zeros(3, 4), 0.0)


def test_info_nce_bad_shape():
    with pytest.raises(ValueError, match="\\[..., B, B\\]"):
        info_nce(torch.zeros(2, 3))


# ---------------------------------------------------------------- MACL

SIMILARITY = torch.tensor(
    [
        [0.3, 0.8, 0.2],  # the diagonal is ignored
        [0.8, 0.9, 0.5],
        [0.2, 0.5, 0.0],
    ]
)


def test_appearance_targets_values():
    targets = appearance_targets(SIMILARITY, 0.1)
    torch.testing.assert_close(targets.sum(-1), torch.ones(3))
    # Row 0: softmax([1, 0.8, 0.2] / 0.1) = [1, e^-2, e^-8] / (1 + e^-2 + e^-8).
    row = torch.tensor([1.0, math.exp(-2), math.exp(-8)])
    torch.testing.assert_close(targets[0], row / row.sum())
    # The similar-looking negative (0.8) gets more mass than the different-looking one (0.2).
    assert targets[0, 1] > targets[0, 2]
    # The diagonal of S plays no part.
    torch.testing.assert_close(appearance_targets(SIMILARITY.clone().fill_diagonal_(-1.0), 0.1), targets)


def test_appearance_targets_zero_temperature_is_one_hot():
    assert torch.equal(appearance_targets(SIMILARITY, 0.0), torch.eye(3))
    tiny = appearance_targets(SIMILARITY, 1e-30)
    assert not tiny.isnan().any()
    torch.testing.assert_close(tiny, torch.eye(3))
    with pytest.raises(ValueError, match="appearance_temperature"):
        appearance_targets(SIMILARITY, -0.1)
    with pytest.raises(ValueError, match="\\[B, B\\]"):
        appearance_targets(torch.zeros(2, 3), 0.1)


def test_macl_hand_value_with_soft_targets():
    eye = torch.eye(2).unsqueeze(1)  # [B=2, L=1, D=2]
    similarity = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    # logits = I (temperature 1); log_softmax of a row = (-log(1 + e^-1), -1 - log(1 + e^-1)).
    # Targets with tau_a = 0.5: (1, e^{(0.5 - 1) / 0.5}) normalised -> mass q = e^-1 / (1 + e^-1) on the negative.
    # CE = log(1 + e^-1) + q, the same in both directions.
    q = math.exp(-1) / (1 + math.exp(-1))
    loss = macl_loss(eye, eye, similarity, temperature=1.0, appearance_temperature=0.5)
    torch.testing.assert_close(loss, torch.tensor(log1pexp(-1.0) + q))
    # Plain InfoNCE: log(1 + e^-1).
    torch.testing.assert_close(macl_loss(eye, eye, temperature=1.0), torch.tensor(log1pexp(-1.0)))


def test_macl_without_appearance_scaling_is_per_layer_infonce():
    torch.manual_seed(0)
    reference = torch.randn(3, 2, 4, requires_grad=True)
    positive = torch.randn(3, 2, 4, requires_grad=True)
    labels = torch.arange(3)
    expected = []
    for layer in range(2):
        logits = F.normalize(reference[:, layer], dim=-1) @ F.normalize(positive[:, layer], dim=-1).T / 0.1
        expected.append((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    expected = torch.stack(expected).mean()

    for similarity, tau_a in ((None, 0.05), (SIMILARITY, 0.0), (SIMILARITY, 1e-6)):
        loss = macl_loss(reference, positive, similarity, temperature=0.1, appearance_temperature=tau_a)
        torch.testing.assert_close(loss, expected)

    loss.backward()
    assert reference.grad.abs().sum() > 0 and positive.grad.abs().sum() > 0


def test_macl_penalises_a_similar_looking_negative_less():
    positive = torch.eye(3).unsqueeze(1)  # [3, 1, 3]
    similarity = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]])

    def loss_with_subject0_drifting_to(negative: int, similarity):
        reference = torch.eye(3)
        reference[0, negative] = 0.5
        return macl_loss(reference.unsqueeze(1), positive, similarity, temperature=0.1, appearance_temperature=0.2)

    # Drifting towards subject 1 (looks like subject 0) costs less than towards subject 2 (looks different).
    assert loss_with_subject0_drifting_to(1, similarity) < loss_with_subject0_drifting_to(2, similarity)
    # Without appearance scaling both drifts cost the same.
    torch.testing.assert_close(loss_with_subject0_drifting_to(1, None), loss_with_subject0_drifting_to(2, None))


def test_macl_bad_shapes():
    tokens = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="expected reference_tokens of shape \\[B, L, D\\], got \\(2, 4\\)"):
        macl_loss(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="positive_tokens"):
        macl_loss(tokens, torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="appearance_similarity of shape \\[2, 2\\]"):
        macl_loss(tokens, tokens, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="temperature"):
        macl_loss(tokens, tokens, temperature=0.0)


# ---------------------------------------------------------------- location


def quarter_mask() -> torch.Tensor:
    # 4x4 mask: the top-left 2x2 cell fully covered, the top-right one half covered, the bottom empty.
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1.0
    mask[..., :2, 2] = 1.0
    return mask


# Against the coverage [[1, 0.5], [0, 0]], the map [[0.8, 0.5], [0.2, 0.5]] has per-cell BCE
# -log 0.8, log 2, -log 0.8, log 2: mean (log 2 - log 0.8) / 2 = log(2.5) / 2.
MAP_2X2 = torch.tensor([[[0.8, 0.5], [0.2, 0.5]]])
BCE_2X2 = math.log(2.5) / 2


def test_location_loss_hand_value():
    torch.testing.assert_close(location_loss([MAP_2X2], quarter_mask()), torch.tensor(BCE_2X2))
    # A second, 1x1 layer at p = 0.5 against coverage 6/16: BCE = log 2; layers are averaged.
    maps = [MAP_2X2.unsqueeze(1), torch.full((1, 1, 1, 1), 0.5)]
    torch.testing.assert_close(location_loss(maps, quarter_mask()), torch.tensor((BCE_2X2 + math.log(2.0)) / 2))


def test_location_loss_valid_frames_and_gradients():
    maps = torch.cat([MAP_2X2, torch.zeros(1, 2, 2)]).to(torch.bfloat16).requires_grad_()
    # Frame 1 has no mask: a placeholder full of NaN must not leak into the loss.
    masks = torch.cat([quarter_mask(), torch.full((1, 1, 4, 4), float("nan"))])
    loss = location_loss([maps], masks, valid=torch.tensor([True, False]))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(BCE_2X2), atol=1e-2, rtol=1e-2)  # bf16 map values
    loss.backward()
    assert maps.grad[0].abs().sum() > 0 and maps.grad[1].abs().sum() == 0

    maps.grad = None
    none_valid = location_loss([maps], masks, valid=torch.tensor([False, False]))
    assert none_valid.item() == 0.0
    none_valid.backward()
    assert torch.equal(maps.grad, torch.zeros_like(maps))


def test_location_loss_clamps_probabilities():
    loss = location_loss([torch.zeros(1, 2, 2)], quarter_mask())
    assert torch.isfinite(loss) and loss > 0


def test_location_loss_bad_shapes():
    with pytest.raises(ValueError, match="at least one"):
        location_loss([], quarter_mask())
    with pytest.raises(ValueError, match="masks of shape \\[B, N, H, W\\]"):
        location_loss([MAP_2X2], torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="location_maps\\[0\\]"):
        location_loss([torch.zeros(2, 2, 2)], quarter_mask())
    with pytest.raises(ValueError, match="valid of shape \\[1\\]"):
        location_loss([MAP_2X2], quarter_mask(), valid=torch.tensor([True, True]))

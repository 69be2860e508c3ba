"""Known-value tests of diffusers_customcontrast.losses (values worked out by hand in the comments), and of MACL's
appearance scaling as the training objective and the training config pass it on."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffusers_customcontrast.data import SubjectTripletDataset, collate_triplets, write_synthetic_dataset
from diffusers_customcontrast.losses import (
    APPEARANCE_SCALINGS,
    appearance_factors,
    appearance_targets,
    cscl_loss,
    diffusion_loss,
    diffusion_target,
    info_nce,
    location_loss,
    macl_loss,
    min_snr_weights,
)
from diffusers_customcontrast.testing.tiny_models import TINY_ADAPTER_CONFIG, tiny_sd15_pipeline
from diffusers_customcontrast.training import (
    BaseModel,
    BatchEncoder,
    ConditioningDropout,
    ConfigError,
    CustomContrastObjective,
    ObjectiveSettings,
    TrainingConfig,
    build_adapter,
    parse_args,
    step_generator,
)
from diffusers_customcontrast.training import objective as objective_module


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
    loss = macl_loss(eye, eye, similarity, 1.0, appearance_temperature=0.5, appearance_scaling="soft_targets")
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
        loss = macl_loss(
            reference, positive, similarity, 0.1, appearance_temperature=tau_a, appearance_scaling="soft_targets"
        )
        torch.testing.assert_close(loss, expected)

    loss.backward()
    assert reference.grad.abs().sum() > 0 and positive.grad.abs().sum() > 0


def test_macl_penalises_a_similar_looking_negative_less():
    positive = torch.eye(3).unsqueeze(1)  # [3, 1, 3]
    similarity = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]])

    def loss_with_subject0_drifting_to(negative: int, similarity):
        reference = torch.eye(3)
        reference[0, negative] = 0.5
        return macl_loss(
            reference.unsqueeze(1),
            positive,
            similarity,
            0.1,
            appearance_temperature=0.2,
            appearance_scaling="soft_targets",
        )

    # Drifting towards subject 1 (looks like subject 0) costs less than towards subject 2 (looks different).
    assert loss_with_subject0_drifting_to(1, similarity) < loss_with_subject0_drifting_to(2, similarity)
    # Without appearance scaling both drifts cost the same.
    torch.testing.assert_close(loss_with_subject0_drifting_to(1, None), loss_with_subject0_drifting_to(2, None))


def test_macl_negative_with_the_reference_appearance_in_soft_targets_mode():
    eye = torch.eye(2).unsqueeze(1)  # [B=2, L=1, D=2]: cos = I
    identical = torch.ones(2, 2)
    # S = 1 off the diagonal: z = (1, 1), so the targets are (1/2, 1/2) whatever tau_a.
    # log_softmax of a row of I = (-log(1 + e^-1), -1 - log(1 + e^-1)) -> CE = log(1 + e^-1) + 1/2 both ways.
    for tau_a in (0.05, 1.0):
        loss = macl_loss(eye, eye, identical, 1.0, appearance_temperature=tau_a, appearance_scaling="soft_targets")
        torch.testing.assert_close(loss, torch.tensor(log1pexp(-1.0) + 0.5))
    # S = all ones leaves no contrast in this mode: the targets are uniform over the batch.
    torch.testing.assert_close(appearance_targets(torch.ones(3, 3), 0.05), torch.full((3, 3), 1 / 3))


# Reference tokens e_0, e_1, e_2 and unit positives p_0 = (.8, .6, 0), p_1 = (0, .8, .6), p_2 = (.6, 0, .8):
# cos[b, c] = p_c[b] = [[.8, 0, .6], [.6, .8, 0], [0, .6, .8]].
CIRCULANT_REFERENCE = torch.eye(3).unsqueeze(1)
CIRCULANT_POSITIVE = torch.tensor([[0.8, 0.6, 0.0], [0.0, 0.8, 0.6], [0.6, 0.0, 0.8]]).unsqueeze(1)


def ce_of_positive_at(positive: float, *negatives: float) -> float:
    """Cross-entropy of one anchor whose logits are the positive's and the negatives'."""
    return -positive + math.log(sum(math.exp(x) for x in (positive, *negatives)))


def test_macl_similarity_scaling_hand_value():
    # Subject 1 looks identical to subject 0 (S = 1); subject 2 looks different (0.25 to subject 0, 0.5 to 1).
    similarity = torch.tensor([[1.0, 1.0, 0.25], [1.0, 1.0, 0.5], [0.25, 0.5, 1.0]])
    loss = macl_loss(
        CIRCULANT_REFERENCE, CIRCULANT_POSITIVE, similarity, temperature=0.5, appearance_scaling="similarity"
    )
    # logits = S * cos / 0.5 off the diagonal, cos / 0.5 on it:
    #   [[1.6, 1 * 0, .25 * 1.2], [1 * 1.2, 1.6, .5 * 0], [.25 * 0, .5 * 1.2, 1.6]]
    #   = [[1.6, 0, .3], [1.2, 1.6, 0], [0, .6, 1.6]].
    # The identical-looking negative (row 1, column 0) keeps its unscaled logit 1.2.
    rows = [(0.0, 0.3), (1.2, 0.0), (0.0, 0.6)]  # negatives of each row
    columns = [(1.2, 0.0), (0.0, 0.6), (0.3, 0.0)]  # negatives of each column (the other direction)
    expected = sum(ce_of_positive_at(1.6, *negatives) for negatives in rows + columns) / 6
    torch.testing.assert_close(loss, torch.tensor(expected))
    # Plain InfoNCE: every row and column has the negatives (0, 1.2).
    plain = macl_loss(CIRCULANT_REFERENCE, CIRCULANT_POSITIVE, similarity, temperature=0.5, appearance_scaling="none")
    torch.testing.assert_close(plain, torch.tensor(ce_of_positive_at(1.6, 0.0, 1.2)))


def test_macl_similarity_scaling_with_all_ones_is_plain_infonce():
    torch.manual_seed(0)
    reference = torch.randn(4, 3, 8)
    positive = torch.randn(4, 3, 8)
    ones = torch.ones(4, 4)
    plain = macl_loss(reference, positive, temperature=0.1)
    torch.testing.assert_close(macl_loss(reference, positive, ones, 0.1, appearance_scaling="similarity"), plain)
    # "none" does not read S at all.
    similarity = torch.rand(4, 4)
    torch.testing.assert_close(macl_loss(reference, positive, similarity, 0.1, appearance_scaling="none"), plain)


# Two subjects: references e_0, e_1, positives (.8, .6), (.6, .8): cos = [[.8, .6], [.6, .8]], logits at tau = 0.5
# [[1.6, 1.2 * f], [1.2 * f, 1.6]] with the negatives' factor f, so the loss is log(1 + e^{1.2 f - 1.6}).
PAIR_REFERENCE = torch.eye(2).unsqueeze(1)
PAIR_POSITIVE = torch.tensor([[0.8, 0.6], [0.6, 0.8]]).unsqueeze(1)


def pair_similarity(negative: float) -> torch.Tensor:
    return torch.tensor([[1.0, negative], [negative, 1.0]])


@pytest.mark.parametrize(
    ("negative_similarity", "factor"),
    [(0.5, 0.5), (1.0, 1.0), (-0.5, 0.0), (1.5, 1.0)],  # negative cosines clamp to 0, rounding above 1 to 1
)
def test_macl_similarity_scaling_clamps_the_factors_to_0_1(negative_similarity, factor):
    similarity = pair_similarity(negative_similarity)
    loss = macl_loss(PAIR_REFERENCE, PAIR_POSITIVE, similarity, temperature=0.5, appearance_scaling="similarity")
    torch.testing.assert_close(loss, torch.tensor(log1pexp(1.2 * factor - 1.6)))


def test_appearance_factors_ignore_the_diagonal_and_clamp():
    factors = appearance_factors(torch.tensor([[0.3, -0.2, 0.7], [-0.2, 0.9, 1.2], [0.7, 1.2, -1.0]]))
    torch.testing.assert_close(factors, torch.tensor([[1.0, 0.0, 0.7], [0.0, 1.0, 1.0], [0.7, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="appearance_similarity of shape \\[B, B\\], got \\(2, 3\\)"):
        appearance_factors(torch.zeros(2, 3))


def test_soft_targets_use_negative_similarities_as_they_are():
    # z = (1, -0.5) at tau_a = 0.5: shifted (0, -1.5) / 0.5 = (0, -3) -> mass e^-3 / (1 + e^-3) on the negative,
    # less than the e^-2 / (1 + e^-2) of S = 0.
    targets = appearance_targets(pair_similarity(-0.5), 0.5)
    torch.testing.assert_close(targets[0, 1], torch.tensor(math.exp(-3) / (1 + math.exp(-3))))
    assert targets[0, 1] < appearance_targets(pair_similarity(0.0), 0.5)[0, 1]


def test_macl_similarity_scaling_pushes_a_similar_looking_negative_harder():
    # The opposite of test_macl_penalises_a_similar_looking_negative_less (soft targets): a negative's logit is
    # S * cos / tau, so drifting towards the look-alike costs more.
    positive = torch.eye(3).unsqueeze(1)
    similarity = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]])

    def loss_with_subject0_drifting_to(negative: int) -> torch.Tensor:
        reference = torch.eye(3)
        reference[0, negative] = 0.5
        return macl_loss(reference.unsqueeze(1), positive, similarity, 0.1, appearance_scaling="similarity")

    assert loss_with_subject0_drifting_to(1) > loss_with_subject0_drifting_to(2)


@pytest.mark.parametrize("appearance_scaling", APPEARANCE_SCALINGS)
def test_macl_gradients_reach_the_tokens_and_never_the_appearance_similarity(appearance_scaling):
    torch.manual_seed(0)
    reference = torch.randn(3, 2, 4, requires_grad=True)
    positive = torch.randn(3, 2, 4, requires_grad=True)
    similarity = SIMILARITY.clone().requires_grad_()
    macl_loss(reference, positive, similarity, appearance_scaling=appearance_scaling).backward()
    assert reference.grad.abs().sum() > 0 and positive.grad.abs().sum() > 0
    assert similarity.grad is None


def test_macl_unknown_appearance_scaling_is_named():
    tokens = torch.zeros(2, 1, 4)
    with pytest.raises(
        ValueError, match="appearance_scaling must be one of 'soft_targets', 'similarity', 'none', got 'paper'"
    ):
        macl_loss(tokens, tokens, appearance_scaling="paper")


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


# ---------------------------------------------------------------- MACL in the training objective

TINY_ADAPTER = {f"adapter_{key}": value for key, value in TINY_ADAPTER_CONFIG.items()}
RESOLUTION = 32
REQUIRED = {"pretrained_model_name_or_path": "org/base", "train_data": "data/"}


def test_objective_passes_the_appearance_scaling_and_gradients_reach_the_s_plus_tokens(tmp_path, monkeypatch):
    write_synthetic_dataset(tmp_path, num_subjects=4, frames_per_subject=2, size=RESOLUTION)
    dataset = SubjectTripletDataset(tmp_path, resolution=RESOLUTION, reference_size=224)
    batch = collate_triplets([dataset[i] for i in range(4)])
    config = TrainingConfig.from_dict({**REQUIRED, "resolution": RESOLUTION, **TINY_ADAPTER})
    base = BaseModel.from_pipeline(tiny_sd15_pipeline())
    base.freeze("cpu", torch.float32)
    torch.manual_seed(0)
    objective = CustomContrastObjective(
        base.unet, build_adapter(config, base), base.noise_scheduler, ObjectiveSettings.from_config(config)
    ).train()
    encoder = BatchEncoder(base, resolution=RESOLUTION, dropout=ConditioningDropout(0.0, 0.0, 0.0))
    inputs = encoder(batch, step_generator(0, 0, 0, 0))
    # The tiny CLIP's S of four different subjects: < 1 off the diagonal, so each mode gives its own loss.
    off_diagonal = inputs.appearance_similarity[~torch.eye(4, dtype=torch.bool)]
    assert (off_diagonal < 0.999).all()

    calls = []

    def recording_macl_loss(reference_tokens, positive_tokens, *args, **kwargs):
        # The pooled S+ tokens of the reference (from the UNet call) and of the positive, as MACL receives them.
        reference_tokens.retain_grad()
        positive_tokens.retain_grad()
        calls.append((reference_tokens, positive_tokens, kwargs["appearance_scaling"]))
        return macl_loss(reference_tokens, positive_tokens, *args, **kwargs)

    monkeypatch.setattr(objective_module, "macl_loss", recording_macl_loss)
    settings = objective.settings
    values = {}
    for mode in APPEARANCE_SCALINGS:
        objective.settings = dataclasses.replace(settings, macl_appearance_scaling=mode)
        calls.clear()
        output = objective(inputs)
        output.loss.backward()
        ((reference, positive, received),) = calls
        assert received == mode
        # The same loss, recomputed from the tokens the objective pooled, and its gradient weighted by lambda_macl.
        ref = reference.detach().requires_grad_()
        pos = positive.detach().requires_grad_()
        expected = macl_loss(
            ref,
            pos,
            inputs.appearance_similarity,
            temperature=settings.macl_temperature,
            appearance_temperature=settings.appearance_temperature,
            appearance_scaling=mode,
        )
        torch.testing.assert_close(output.terms["macl"], expected.detach())
        expected.backward()
        assert reference.grad.abs().sum() > 0 and positive.grad.abs().sum() > 0
        torch.testing.assert_close(reference.grad, settings.lambda_macl * ref.grad)
        torch.testing.assert_close(positive.grad, settings.lambda_macl * pos.grad)
        objective.zero_grad()
        values[mode] = output.terms["macl"].item()
    assert len({round(value, 4) for value in values.values()}) == 3, values


def test_macl_appearance_scaling_config_field_round_trips_and_rejects_bad_values(tmp_path):
    assert TrainingConfig().macl_appearance_scaling == "similarity"
    config = TrainingConfig.from_dict({**REQUIRED, "macl_appearance_scaling": "similarity"}).validate()
    assert ObjectiveSettings.from_config(config).macl_appearance_scaling == "similarity"
    path = tmp_path / "run.yaml"
    config.to_yaml(path)
    assert "macl_appearance_scaling: similarity" in path.read_text()
    assert TrainingConfig.from_yaml(path) == config
    assert parse_args(["--config", str(path), "--macl_appearance_scaling", "none"]).macl_appearance_scaling == "none"
    with pytest.raises(
        ConfigError,
        match="^Invalid training configuration: macl_appearance_scaling must be one of 'soft_targets', "
        "'similarity', 'none', got 'paper'\\.$",
    ):
        config.replace(macl_appearance_scaling="paper").validate()


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

"""The memory model: the full FRMDN density (integrates to 1), alignment, sampling, masks, heads,
checkpoints."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal

from frmdn_worldmodels.models.memory import MemoryModel, MemoryOutput
from frmdn_worldmodels.models.mixture import gmm_log_prob
from frmdn_worldmodels.runtime.config import MemoryConfig
from frmdn_worldmodels.runtime.io import load_checkpoint, save_checkpoint

F64 = torch.float64


def small_config(**overrides) -> MemoryConfig:
    defaults = {"hidden": 12, "components": 3, "rank": 2, "flow_blocks": 2, "flow_hidden": 16}
    return MemoryConfig(**(defaults | overrides))


def make_model(target_dim=3, cond_dim=2, seed=0, flow_scale=0.4, **overrides) -> MemoryModel:
    """A float64 model whose flows are NOT the identity (their zero-initialised last layers get random
    weights)."""
    torch.manual_seed(seed)
    model = MemoryModel(target_dim, cond_dim, small_config(**overrides)).double()
    if model.flow is not None:
        with torch.no_grad():
            for parameter in [*model.flow.parameters(), *model.member_flows.parameters()]:
                parameter.normal_(0.0, flow_scale)
    return model


def random_sequences(batch, steps, target_dim=3, cond_dim=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, steps + 1, target_dim, generator=gen, dtype=F64)
    cond = torch.randn(batch, steps, cond_dim, generator=gen, dtype=F64) if cond_dim else None
    return y, cond


def expand_output(out: MemoryOutput, n: int) -> MemoryOutput:
    """Repeat a single-element output [1, ...] n times (to score a grid of targets under one distribution)."""
    return MemoryOutput(
        **{
            field.name: value.expand(n, *value.shape[1:]) if torch.is_tensor(value) else value
            for field in dataclasses.fields(out)
            for value in [getattr(out, field.name)]
        }
    )


# ---------------------------------------------------------------- the density itself


def grid_density(model, out, half_width=20.0, points=700):
    """log p and log|det df/dy| of the whole model on a 2-D grid, with the cell area."""
    axis = torch.linspace(-half_width, half_width, points, dtype=F64)
    grid = torch.cartesian_prod(axis, axis)
    wide = expand_output(out, grid.shape[0])
    with torch.no_grad():
        log_p = model.log_prob(grid, wide)
        _, logdet = model.flow(grid, wide.hidden if model.config.flow_context else None)
    return grid, log_p, logdet, (axis[1] - axis[0]) ** 2


@pytest.mark.parametrize("flow_context", [False, True], ids=["plain-flow", "context-flow"])
def test_full_frmdn_density_integrates_to_one_on_a_grid_and_the_log_det_matters(flow_context):
    model = make_model(target_dim=2, cond_dim=1, flow_context=flow_context, components=3, rank=1, seed=2)
    with torch.no_grad():
        out, _ = model.step(torch.tensor([[0.3, -0.2]], dtype=F64), torch.tensor([[1.0]], dtype=F64), None)
    _, log_p, logdet, area = grid_density(model, out)
    total = (log_p.exp().sum() * area).item()
    assert abs(total - 1.0) < 1e-3, f"the density integrates to {total}"
    # The test is sensitive: dropping the log-determinant (or flipping its sign) visibly breaks normalisation.
    without_logdet = ((log_p - logdet).exp().sum() * area).item()
    flipped = ((log_p - 2 * logdet).exp().sum() * area).item()
    assert abs(without_logdet - 1.0) > 0.05 and abs(flipped - 1.0) > 0.05, (without_logdet, flipped)


def test_samples_follow_the_density_they_are_scored_with():
    """Histogram of model.sample (z ~ GMM, y = f^-1(z)) against the cell probabilities of exp(model.log_prob):
    sampling through f instead of f^-1, or scoring with a wrong log-det, shows up here."""
    model = make_model(target_dim=2, cond_dim=0, components=2, rank=1, seed=3, flow_scale=0.6)
    with torch.no_grad():
        out, _ = model.step(torch.tensor([[0.5, 0.5]], dtype=F64), None, None)
        n = 50_000
        samples = model.sample(expand_output(out, n), generator=torch.Generator().manual_seed(0))
    half_width, cells = 8.0, 8
    grid, log_p, _, area = grid_density(model, out, half_width=half_width, points=400)
    edges = torch.linspace(-half_width, half_width, cells + 1, dtype=F64)

    def cell_index(points):
        ij = (torch.bucketize(points, edges) - 1).clamp(0, cells - 1)
        return ij[:, 0] * cells + ij[:, 1]

    inside = (samples.abs() < half_width).all(-1)
    observed = torch.bincount(cell_index(samples[inside]), minlength=cells**2).to(F64) / n
    expected = torch.bincount(cell_index(grid), weights=log_p.exp() * area, minlength=cells**2)
    standard_error = (expected * (1 - expected) / n).sqrt()
    assert ((observed - expected).abs() < 5 * standard_error + 2e-3).all(), (observed - expected).abs().max()
    assert expected.max() < 0.5, "the distribution should spread over several cells"


def test_log_prob_equals_dense_mixture_of_flow_output_plus_autograd_log_det():
    model = make_model(target_dim=4, cond_dim=2, flow_context=True, seed=4)
    y, cond = random_sequences(2, 3, target_dim=4)
    with torch.no_grad():
        out, _ = model(y[:, :-1], cond)
    target = y[:, 1:].clone().requires_grad_()
    z, _ = model.flow(target, out.hidden)
    jacobian = torch.stack(
        [torch.autograd.grad(z[..., j].sum(), target, retain_graph=True)[0] for j in range(4)], dim=-2
    )
    precision = torch.diag_embed(out.diag) + out.u @ out.u.transpose(-1, -2)
    dense = MultivariateNormal(out.mu, precision_matrix=precision).log_prob(z.detach().unsqueeze(-2))
    expected = torch.logsumexp(torch.log_softmax(out.logit_pi, -1) + dense, -1)
    expected = expected + torch.linalg.slogdet(jacobian).logabsdet
    torch.testing.assert_close(model.log_prob(y[:, 1:], out), expected.detach(), rtol=1e-10, atol=1e-10)


def test_rmdn_has_no_flow_and_scores_the_target_directly():
    model = make_model(kind="rmdn", rank=0, seed=5)
    assert model.flow is None
    y, cond = random_sequences(2, 4)
    log_p, out = model.sequence_log_prob(y, cond)
    assert out.u is None
    torch.testing.assert_close(log_p, gmm_log_prob(y[:, 1:], out.logit_pi, out.mu, out.diag))


# ---------------------------------------------------------------- shapes and alignment


@pytest.mark.parametrize("kind, rank", [("frmdn", 2), ("rmdn", 0), ("frmdn", 0), ("rmdn", 3)])
def test_output_shapes(kind, rank):
    b, t, d, c, k, h = 3, 5, 4, 2, 3, 12
    model = make_model(target_dim=d, cond_dim=c, kind=kind, rank=rank)
    y, cond = random_sequences(b, t, target_dim=d, cond_dim=c)
    out, (h_n, c_n) = model(y[:, :-1], cond)
    assert out.logit_pi.shape == (b, t, k) and out.mu.shape == out.diag.shape == (b, t, k, d)
    assert out.u is None if rank == 0 else out.u.shape == (b, t, k, d, rank)
    # the reward and done heads read the next latent too: none without it
    assert out.reward is None and out.done_logit is None and out.hidden.shape == (b, t, h)
    reward, done = model.outcome(out, y[:, 1:])
    assert reward.shape == done.shape == (b, t)
    assert h_n.shape == c_n.shape == (1, b, h)
    log_p, scored = model.sequence_log_prob(y, cond)
    assert log_p.shape == (b, t) and scored.reward.shape == scored.done_logit.shape == (b, t)
    one, _ = model.step(y[:, 0], cond[:, 0], None)
    next_y = model.sample(one)
    assert (
        one.mu.shape == (b, k, d) and model.outcome(one, next_y)[0].shape == (b,) and next_y.shape == (b, d)
    )


def test_heads_can_be_switched_off():
    model = make_model(predict_reward=False, predict_done=False)
    y, cond = random_sequences(2, 4)
    out, _ = model(y[:, :-1], cond)
    assert out.reward is None and out.done_logit is None
    losses = model.sequence_loss(y, cond, rewards=torch.ones(2, 4), dones=torch.ones(2, 4))
    assert losses["reward_loss"] == 0 and losses["done_loss"] == 0
    torch.testing.assert_close(losses["loss"], losses["nll_per_dim"])


def test_sequence_log_prob_matches_step_by_step_calls():
    """Output t reads (y_t, c_t) and scores y_{t+1}: the same numbers whether run as a sequence or
    stepwise."""
    model = make_model(flow_context=True, seed=6)
    y, cond = random_sequences(3, 6)
    with torch.no_grad():
        sequence, out = model.sequence_log_prob(y, cond)
        state = model.initial_state(3)
        assert all(s.shape == (1, 3, 12) and (s == 0).all() and s.dtype == F64 for s in state)
        for t in range(6):
            h_before = state[0][0].clone()
            step, state = model.step(y[:, t], cond[:, t], state)
            torch.testing.assert_close(model.log_prob(y[:, t + 1], step), sequence[:, t])
            reward, done = model.outcome(step, y[:, t + 1])
            torch.testing.assert_close(reward, out.reward[:, t])
            torch.testing.assert_close(done, out.done_logit[:, t])
            torch.testing.assert_close(step.hidden, out.hidden[:, t])
            # the state handed to the controller at t is the one from before reading (y_t, c_t)
            expected_before = torch.zeros_like(h_before) if t == 0 else out.hidden[:, t - 1]
            torch.testing.assert_close(h_before, expected_before)


def test_outputs_are_causal():
    model = make_model(seed=7)
    y, cond = random_sequences(2, 6)
    with torch.no_grad():
        log_p, out = model.sequence_log_prob(y, cond)
        changed = y.clone()
        changed[:, 4] += 1.0
        log_p2, out2 = model.sequence_log_prob(changed, cond)
    torch.testing.assert_close(log_p2[:, :3], log_p[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(out2.mu[:, :4], out.mu[:, :4], rtol=0, atol=0)
    assert (log_p2[:, 3] - log_p[:, 3]).abs().min() > 0, "y_4 is the target of step 3"
    assert (out2.mu[:, 4] - out.mu[:, 4]).abs().max() > 0, "y_4 is read at step 4"


def test_initial_state_follows_model_dtype_and_equals_no_state():
    model = make_model(seed=8)
    y, cond = random_sequences(2, 1)
    with torch.no_grad():
        a, _ = model.step(y[:, 0], cond[:, 0], model.initial_state(2))
        b, _ = model.step(y[:, 0], cond[:, 0], None)
    torch.testing.assert_close(a.mu, b.mu, rtol=0, atol=0)


# ---------------------------------------------------------------- sampling


def test_zero_temperature_sample_is_flow_inverse_of_the_most_likely_mean():
    model = make_model(flow_context=True, seed=9)
    y, cond = random_sequences(4, 1)
    with torch.no_grad():
        out, _ = model.step(y[:, 0], cond[:, 0], None)
        first, second = model.sample(out, 0.0), model.sample(out, 0.0)
        best = out.mu[torch.arange(4), out.logit_pi.argmax(-1)]
        expected = model.flow.inverse(best, out.hidden)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, expected)


@pytest.mark.parametrize("temperature", [0.5, 1.5])
def test_temperature_scales_the_spread_in_flow_space(temperature):
    """f(sample) is drawn from the mixture; with K=1 its covariance must be tau (D + U U^T)^-1."""
    model = make_model(components=1, rank=2, seed=10)
    y, cond = random_sequences(1, 1)
    n = 40_000
    with torch.no_grad():
        out, _ = model.step(y[:, 0], cond[:, 0], None)
        samples = model.sample(expand_output(out, n), temperature, torch.Generator().manual_seed(1))
        z, _ = model.flow(samples)
    covariance = temperature * torch.linalg.inv(torch.diag(out.diag[0, 0]) + out.u[0, 0] @ out.u[0, 0].T)
    variance = covariance.diagonal()
    cov_se = ((variance[:, None] * variance[None, :] + covariance.square()) / n).sqrt()
    assert ((torch.cov(z.T) - covariance).abs() < 5 * cov_se).all()
    assert ((z.mean(0) - out.mu[0, 0]).abs() < 5 * (variance / n).sqrt()).all()


def test_sampling_is_reproducible_with_a_generator():
    model = make_model(seed=11)
    y, cond = random_sequences(5, 1)
    with torch.no_grad():
        out, _ = model.step(y[:, 0], cond[:, 0], None)
        a = model.sample(out, 1.15, torch.Generator().manual_seed(3))
        b = model.sample(out, 1.15, torch.Generator().manual_seed(3))
        c = model.sample(out, 1.15, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- losses, masks, heads


def test_mask_excludes_padded_steps():
    model = make_model(seed=12)
    y, cond = random_sequences(3, 6)
    rewards, dones = torch.randn(3, 6, dtype=F64), torch.zeros(3, 6, dtype=F64)
    lengths = torch.tensor([6, 4, 2])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    losses = model.sequence_loss(y, cond, rewards, dones, mask=mask)
    log_p, _ = model.sequence_log_prob(y, cond)
    torch.testing.assert_close(losses["nll"], -log_p[mask].mean())
    torch.testing.assert_close(losses["nll_per_dim"], losses["nll"] / 3)
    float_mask = model.sequence_loss(y, cond, rewards, dones, mask=mask.to(F64))
    for key in losses:
        torch.testing.assert_close(float_mask[key], losses[key])
    # garbage in the padding (targets, inputs, rewards, dones after each sequence's end) changes nothing
    padded_y, padded_rewards, padded_dones = y.clone(), rewards.clone(), dones.clone()
    for i, length in enumerate(lengths.tolist()):
        padded_y[i, length + 1 :] = 1e3
        padded_rewards[i, length:] = -1e3
        padded_dones[i, length:] = 1.0
    padded = model.sequence_loss(padded_y, cond, padded_rewards, padded_dones, mask=mask)
    for key in losses:
        torch.testing.assert_close(padded[key], losses[key])
    unmasked = model.sequence_loss(padded_y, cond, padded_rewards, padded_dones)
    assert unmasked["nll"] > losses["nll"] + 1.0, "without the mask the padding must count"


def test_heads_losses_and_done_pos_weight_match_manual_formulas():
    model = make_model(seed=13)
    y, cond = random_sequences(2, 5)
    rewards = torch.randn(2, 5, dtype=F64)
    dones = torch.zeros(2, 5, dtype=F64)
    dones[:, -1] = 1.0  # one positive per episode, at its last transition
    losses = model.sequence_loss(
        y, cond, rewards, dones, done_pos_weight=4.0, reward_weight=0.5, done_weight=2.0
    )
    log_p, out = model.sequence_log_prob(y, cond)
    torch.testing.assert_close(losses["reward_loss"], (out.reward - rewards).square().mean())
    p = torch.sigmoid(out.done_logit)
    manual_bce = -(4.0 * dones * p.log() + (1 - dones) * (1 - p).log()).mean()
    torch.testing.assert_close(losses["done_loss"], manual_bce)
    torch.testing.assert_close(losses["nll"], -log_p.mean())
    torch.testing.assert_close(
        losses["loss"], losses["nll_per_dim"] + 0.5 * losses["reward_loss"] + 2.0 * manual_bce
    )
    # no pos_weight (None or 0) is the plain BCE
    plain = F.binary_cross_entropy_with_logits(out.done_logit, dones)
    for weight in (None, 0.0):
        torch.testing.assert_close(
            model.sequence_loss(y, cond, None, dones, done_pos_weight=weight)["done_loss"], plain
        )
    # absent targets give zero head losses
    bare = model.sequence_loss(y, cond)
    assert bare["reward_loss"] == 0 and bare["done_loss"] == 0


def test_done_pos_weight_scales_the_gradient_of_positive_steps():
    model = make_model(seed=14)
    y, cond = random_sequences(1, 4)
    dones = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=F64)

    def positive_logit_grad(weight):
        model.zero_grad()
        model.sequence_loss(y, cond, None, dones, done_pos_weight=weight)["done_loss"].backward()
        return model.done_head.bias.grad.clone()

    # dBCE/dlogit is -w (1 - sigmoid) on a positive and sigmoid on a negative; the bias sums them
    # (mean over T)
    _, out = model.sequence_log_prob(y, cond)
    p = torch.sigmoid(out.done_logit.detach())[0]
    for weight in (1.0, 10.0):
        expected = (p[:3].sum() - weight * (1 - p[3])) / 4
        torch.testing.assert_close(positive_logit_grad(weight), expected.reshape(1))


def test_loss_gradients_reach_every_module():
    model = make_model(flow_context=True, seed=15)
    y, cond = random_sequences(2, 4)
    losses = model.sequence_loss(
        y, cond, torch.randn(2, 4, dtype=F64), torch.zeros(2, 4, dtype=F64), done_pos_weight=5.0
    )
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.isfinite().all(), name
    for module in ("lstm", "mixture_head", "flow", "reward_head", "done_head"):
        norm = sum(p.grad.norm() for n, p in model.named_parameters() if n.startswith(module))
        assert norm > 0, module


@pytest.mark.parametrize("activation", ["softplus", "exp"])
def test_diagonal_respects_floor_and_clamp(activation):
    model = make_model(diag_activation=activation, diag_floor=0.05, seed=16)
    with torch.no_grad():
        model.mixture_head.weight.mul_(50.0)  # push the raw outputs to extremes
    y, cond = random_sequences(4, 5)
    with torch.no_grad():
        out, _ = model(y[:, :-1], cond)
        assert out.diag.min() >= 0.05 and out.diag.isfinite().all()
        assert model.sequence_log_prob(y, cond)[0].isfinite().all()
        model.config.diag_clamp = [0.1, 1.9]
        clamped, _ = model(y[:, :-1], cond)
    assert clamped.diag.min() >= 0.1 and clamped.diag.max() <= 1.9
    assert out.diag.max() > 1.9 and out.diag.min() < 0.1, "the extremes should have needed the clamp"


# ---------------------------------------------------------------- checkpoints and errors


def test_checkpoint_round_trip(tmp_path):
    model = make_model(flow_context=True, diag_clamp=[0.1, 1.9], rank=1, seed=17).float()
    path = tmp_path / "memory.pt"
    save_checkpoint(path, **model.to_checkpoint())
    restored = MemoryModel.from_checkpoint(load_checkpoint(path))
    assert restored.config == model.config and restored.target_dim == 3 and restored.cond_dim == 2
    y, cond = (t.float() for t in random_sequences(2, 4))
    with torch.no_grad():
        torch.testing.assert_close(
            restored.sequence_log_prob(y, cond)[0], model.sequence_log_prob(y, cond)[0], rtol=0, atol=0
        )


@pytest.mark.parametrize(
    "target_dim, overrides, match",
    [
        (3, {"kind": "maf"}, "kind"),
        (3, {"diag_activation": "relu"}, "diag_activation"),
        (3, {"components": 0}, "components"),
        (3, {"rank": -1}, "rank"),
        (3, {"hidden": 0}, "hidden"),
        (3, {"diag_clamp": [1.0, 0.5]}, "diag_clamp"),
        (3, {"diag_clamp": [0.0, 1.0]}, "diag_clamp"),
        (3, {"diag_clamp": [0.5]}, "diag_clamp"),
        (3, {"dropout": 1.0}, "dropout"),
        (3, {"dropout": -0.1}, "dropout"),
        (3, {"ensemble": 0}, "ensemble"),
        (1, {"kind": "frmdn"}, "dim"),  # a coupling flow cannot split a 1-D target
    ],
)
def test_bad_config_raises_value_error(target_dim, overrides, match):
    with pytest.raises(ValueError, match=match):
        MemoryModel(target_dim, 0, small_config(**overrides))


def test_bad_inputs_raise_value_error_naming_the_shapes():
    model = make_model(seed=18)
    y, cond = random_sequences(2, 4)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\], got \(2, 4, 4\)"):
        model.sequence_log_prob(torch.randn(2, 5, 4, dtype=F64), cond)
    with pytest.raises(ValueError, match="got None"):
        model.sequence_log_prob(y, None)
    with pytest.raises(ValueError, match=r"\(2, 3, 2\)"):
        model.sequence_log_prob(y, cond[:, :3])
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        model.sequence_log_prob(y[:, :, 0], cond)
    with pytest.raises(ValueError, match=r"\(2, 1, 3\)"):
        model.sequence_log_prob(y[:, :1], cond[:, :0])
    with pytest.raises(ValueError, match=r"\(2, 4, 1\)"):
        model.sequence_loss(y, cond, rewards=torch.zeros(2, 4, 1, dtype=F64))
    with pytest.raises(ValueError, match=r"\(4,\)"):  # a [T] reward would broadcast over the batch
        model.sequence_loss(y, cond, rewards=torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        model.sequence_loss(y, cond, mask=torch.ones(2, 5, dtype=torch.bool))
    unconditioned = make_model(cond_dim=0, seed=18)
    with pytest.raises(ValueError, match="no conditioning"):
        unconditioned.sequence_log_prob(y, cond)


# ---------------------------------------------------------------- dream regularisers: dropout, an ensemble


def test_dropout_drops_what_the_heads_read_in_training_only():
    """M trains with dropout on the LSTM output before the heads: train-mode losses vary from call to call,
    eval mode is deterministic and is the model without dropout; the LSTM's state is never dropped."""
    model = make_model(dropout=0.4, flow_context=True, seed=19)
    plain = make_model(seed=19, flow_context=True)
    plain.load_state_dict(model.state_dict())  # dropout has no parameters: the same names
    y, cond = random_sequences(3, 6)
    rewards, dones = torch.randn(3, 6, dtype=F64), torch.zeros(3, 6, dtype=F64)
    model.train()
    trained = [model.sequence_loss(y, cond, rewards, dones)["loss"] for _ in range(3)]
    assert len({loss.item() for loss in trained}) == 3
    trained[0].backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    model.eval()
    evaluated = [model.sequence_loss(y, cond, rewards, dones) for _ in range(2)]
    reference = plain.sequence_loss(y, cond, rewards, dones)
    for key in reference:
        torch.testing.assert_close(evaluated[0][key], evaluated[1][key], rtol=0, atol=0)
        torch.testing.assert_close(evaluated[0][key], reference[key], rtol=0, atol=0)
    assert all(loss.item() != evaluated[0]["loss"].item() for loss in trained)
    # in training: the heads read h * mask / (1 - p); the LSTM's state (and its next steps) are untouched
    model.train()
    with torch.no_grad():
        out, state = model(y[:, :-1], cond)
        reference_out, reference_state = plain(y[:, :-1], cond)
    for part, reference_part in zip(state, reference_state):
        torch.testing.assert_close(part, reference_part, rtol=0, atol=0)
    dropped = out.hidden == 0
    assert 0.25 < dropped.double().mean() < 0.55
    torch.testing.assert_close(out.hidden[~dropped], reference_out.hidden[~dropped] / 0.6)
    # no dropout: no module, and eval mode is train mode
    assert plain.dropout is None and plain.training
    plain.eval()
    for key, value in plain.sequence_loss(y, cond, rewards, dones).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_one_member_is_the_single_memory_of_before():
    """ensemble = 1 (the default) keeps the parameter names and shapes of the memory before ensembles, so
    its checkpoints (whose config has no ``dropout`` or ``ensemble``) load."""
    k, d, r, h = 3, 3, 2, 12
    model = make_model(seed=20).float()
    flow = [
        f"flow.blocks.{block}.{net}.{layer}.{part}"
        for block in range(2)
        for net in ("scale", "shift")
        for layer in (0, 2)
        for part in ("weight", "bias")
    ]
    lstm = [f"lstm.{part}_l0" for part in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    heads = [
        f"{head}.{part}"
        for head in ("mixture_head", "reward_head", "done_head")
        for part in ("weight", "bias")
    ]
    assert sorted(model.state_dict()) == sorted(lstm + heads + flow)
    assert model.mixture_head.weight.shape == (k + 2 * k * d + k * d * r, h)
    assert model.reward_head.weight.shape == model.done_head.weight.shape == (1, h + d)
    model = make_model(seed=20, heads_read_z=False).float()
    assert model.reward_head.weight.shape == model.done_head.weight.shape == (1, h)
    payload = model.to_checkpoint()
    new_fields = ("dropout", "ensemble", "heads_read_z")
    old = {key: value for key, value in payload.items() if key not in ("done_pos_weight", "done_horizon")} | {
        "config": {key: value for key, value in payload["config"].items() if key not in new_fields}
    }
    restored = MemoryModel.from_checkpoint(old)
    assert restored.config == model.config and restored.ensemble == 1 and restored.dropout is None
    y, cond = (t.float() for t in random_sequences(2, 4))
    with torch.no_grad():
        torch.testing.assert_close(
            restored.sequence_log_prob(y, cond)[0], model.sequence_log_prob(y, cond)[0], rtol=0, atol=0
        )


@pytest.mark.parametrize("kind, flow_context", [("frmdn", True), ("frmdn", False), ("rmdn", False)])
def test_an_ensemble_is_its_members_on_one_lstm_trained_on_their_mean_loss(kind, flow_context):
    model = make_model(ensemble=3, kind=kind, flow_context=flow_context, seed=21)
    assert len(model.member_flows) == (2 if kind == "frmdn" else 0)
    y, cond = random_sequences(3, 5)
    rewards, dones = torch.randn(3, 5, dtype=F64), (torch.rand(3, 5) < 0.3).to(F64)
    singles = [model.member_model(m) for m in range(3)]
    with torch.no_grad():
        for m, single in enumerate(singles):
            assert single.ensemble == 1 and single.config.kind == kind
            # each member alone: the shared LSTM and that member's heads and flow
            for name, parameter in single.lstm.named_parameters():
                assert torch.equal(parameter, getattr(model.lstm, name))
            out, _ = model(y[:, :-1], cond, member=m)
            alone, _ = single(y[:, :-1], cond)
            assert out.member == m
            for field in ("logit_pi", "mu", "diag", "u", "reward", "done_logit", "hidden"):
                torch.testing.assert_close(getattr(out, field), getattr(alone, field))
            torch.testing.assert_close(model.log_prob(y[:, 1:], out), single.log_prob(y[:, 1:], alone))
            generator = torch.Generator().manual_seed(m)
            torch.testing.assert_close(
                model.sample(out, 1.1, generator), single.sample(alone, 1.1, torch.Generator().manual_seed(m))
            )
        # the members differ (their heads start apart), and the reported NLL is the mean of theirs
        log_probs = [single.sequence_log_prob(y, cond)[0] for single in singles]
        assert not torch.allclose(log_probs[0], log_probs[1])
        torch.testing.assert_close(model.sequence_log_prob(y, cond)[0], sum(log_probs) / 3)
    # the loss (and each part) is the mean over the members
    losses = model.sequence_loss(y, cond, rewards, dones, done_pos_weight=2.0)
    parts = [single.sequence_loss(y, cond, rewards, dones, done_pos_weight=2.0) for single in singles]
    for key in losses:
        torch.testing.assert_close(losses[key], sum(part[key] for part in parts) / 3)
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    width = model.mixture_head.weight.shape[0] // 3
    for m in range(3):  # every member's rows of every head get a gradient
        assert model.mixture_head.weight.grad[m * width : (m + 1) * width].abs().sum() > 0
        assert (
            model.reward_head.weight.grad[m].abs().sum() > 0
            and model.done_head.weight.grad[m].abs().sum() > 0
        )
    with pytest.raises(ValueError, match="member"):
        model.step(y[:, 0], cond[:, 0], None, member=3)


def test_an_ensemble_with_dropout_round_trips_through_a_checkpoint(tmp_path):
    model = make_model(ensemble=3, dropout=0.2, flow_context=True, seed=22).float().eval()
    path = tmp_path / "memory.pt"
    save_checkpoint(path, **model.to_checkpoint())
    restored = MemoryModel.from_checkpoint(load_checkpoint(path)).eval()
    assert restored.config == model.config and restored.ensemble == 3 and restored.dropout.p == 0.2
    assert sorted(restored.state_dict()) == sorted(model.state_dict())
    y, cond = (t.float() for t in random_sequences(2, 4))
    with torch.no_grad():
        torch.testing.assert_close(
            restored.sequence_log_prob(y, cond)[0], model.sequence_log_prob(y, cond)[0], rtol=0, atol=0
        )
        for m in range(3):
            torch.testing.assert_close(
                restored.member_model(m).sequence_log_prob(y, cond)[0],
                model.member_model(m).sequence_log_prob(y, cond)[0],
                rtol=0,
                atol=0,
            )

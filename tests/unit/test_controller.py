"""The controller, linear and with a hidden layer: flat parameters <-> (W, b) or (W1, b1, W2, b2), single and
population forms against a dense reference and each other, action squashing, the initial parameters, the
memory's action encoding matching the envs' ``encode_action``, and ``controller.hidden``'s check."""

import numpy as np
import pytest
import torch

from frmdn_worldmodels.games.envs import action_dim, encode_action
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.runtime.config import ConfigError, EnvConfig, load_config

MARIO = EnvConfig(name="mario", mario_actions="simple")


@pytest.fixture
def car():
    return Controller(z_dim=5, h_dim=7, action_dim=3, discrete=False)


@pytest.fixture
def mario():
    return Controller(z_dim=5, h_dim=7, action_dim=action_dim(MARIO), discrete=True)


def test_param_count_and_flat_round_trip(car):
    assert car.num_params == (5 + 7) * 3 + 3
    params = torch.randn(car.num_params)
    weight, bias = car.split(params)
    assert weight.shape == (3, 12) and bias.shape == (3,)
    assert torch.equal(car.join(weight, bias), params)
    # W is stored row by row: W[i, j] = params[i * (Z + H) + j]
    assert weight[1, 4] == params[12 + 4] and bias[2] == params[36 + 2]
    population = torch.randn(4, car.num_params)
    assert torch.equal(car.join(*car.split(population)), population)


def test_logits_match_dense_reference_single_and_population(car):
    torch.manual_seed(0)
    population = torch.randn(4, car.num_params)
    z, h = torch.randn(4, 6, 5), torch.randn(4, 6, 7)
    batched = car.logits(population, torch.cat([z, h], -1))
    assert batched.shape == (4, 6, 3)
    for p in range(4):
        weight, bias = car.split(population[p])
        reference = torch.cat([z[p], h[p]], -1) @ weight.T + bias
        torch.testing.assert_close(batched[p], reference)
        torch.testing.assert_close(car.logits(population[p], torch.cat([z[p], h[p]], -1)), reference)


def test_continuous_actions_are_in_the_carracing_box(car):
    torch.manual_seed(0)  # independent of what earlier tests left in the global generator
    params = 10 * torch.randn(car.num_params)
    actions = car.act(params, 10 * torch.randn(100, 5), torch.rand(100, 7) * 2 - 1)
    assert actions.shape == (100, 3)
    assert actions[:, 0].min() >= -1 and actions[:, 0].max() <= 1
    assert actions[:, 1:].min() >= 0 and actions[:, 1:].max() <= 1
    assert actions[:, 0].min() < -0.5 and actions[:, 1:].max() > 0.5  # not squashed to a point
    zero = car.act(torch.zeros(car.num_params), torch.zeros(1, 5), torch.zeros(1, 7))
    torch.testing.assert_close(
        zero, torch.tensor([[0.0, 0.5, 0.0]])
    )  # brake = max(tanh, 0): a fresh controller does not brake


def test_discrete_action_is_the_argmax(mario):
    params = torch.zeros(mario.num_params)
    weight, bias = mario.split(params)
    bias[4] = 1.0  # views: this edits params
    assert mario.act(params, torch.zeros(2, 5), torch.zeros(2, 7)).tolist() == [4, 4]
    weight[2, 0] = 5.0  # z_0 > 0.2 makes action 2 win
    assert mario.act(params, torch.tensor([[1.0, 0, 0, 0, 0]]), torch.zeros(1, 7)).tolist() == [2]


def test_a_sampling_controller_draws_from_the_softmax_of_its_logits():
    """``policy: sample``: the inverse-CDF draw at uniforms u has softmax(logits)'s frequencies (against
    torch.distributions.Categorical's probabilities), the same u gives the same action, and a controller that
    does not sample neither needs nor draws uniforms."""
    sampler = Controller(5, 7, 4, discrete=True, sample=True)
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]).expand(20000, 2, 4)
    uniforms = sampler.uniforms((20000, 2), generator)
    actions = sampler.squash(logits, uniforms)
    assert actions.shape == (20000, 2) and actions.dtype == torch.int64
    for row in range(2):
        counts = torch.bincount(actions[:, row], minlength=4) / 20000
        expected = torch.distributions.Categorical(logits=logits[0, row]).probs
        torch.testing.assert_close(counts, expected, rtol=0, atol=0.015)
    assert torch.equal(sampler.squash(logits, uniforms), actions)
    assert sampler.squash(logits[:1], torch.tensor([[0.0, 0.9999999]])).tolist() == [[0, 3]]
    with pytest.raises(ValueError, match="one uniform per action"):
        sampler.squash(logits)
    argmax = Controller(5, 7, 4, discrete=True)
    state = generator.get_state()
    assert argmax.uniforms((3, 2), generator) is None and torch.equal(generator.get_state(), state)
    with pytest.raises(ValueError, match="continuous"):
        Controller(5, 7, 3, discrete=False, sample=True)


def test_memory_input_matches_the_envs_encode_action(car, mario):
    actions = torch.tensor([0, 3, 5])
    expected = np.stack([encode_action(MARIO, int(a)) for a in [0, 3, 5]])
    assert np.array_equal(mario.encode(actions).numpy(), expected)
    continuous = torch.tensor([[0.3, 0.2, 0.9]])
    assert np.array_equal(
        car.encode(continuous).numpy()[0], encode_action(EnvConfig(), continuous[0].numpy())
    )


def test_wrong_shapes_are_refused(car):
    with pytest.raises(ValueError, match="parameters"):
        car.split(torch.zeros(car.num_params + 1))
    with pytest.raises(ValueError, match="features"):
        car.logits(torch.zeros(car.num_params), torch.zeros(2, 11))
    with pytest.raises(ValueError, match="population"):
        car.logits(torch.zeros(3, car.num_params), torch.zeros(2, 4, 12))
    with pytest.raises(ValueError, match="3 actions"):
        Controller(5, 7, 4, discrete=False)


# ---- the contract, linear and with a hidden layer ----------------------------------------------------------


@pytest.fixture(
    params=[(0, False), (4, False), (0, True), (4, True)], ids=["car", "car-h4", "mario", "mario-h4"]
)
def any_controller(request):
    hidden, discrete = request.param
    return Controller(5, 7, action_dim(MARIO) if discrete else 3, discrete, hidden)


def test_param_count_split_and_join(any_controller):
    c, (a, n) = any_controller, (any_controller.action_dim, any_controller.hidden)
    assert c.num_params == ((5 + 7 + 1) * a if n == 0 else (5 + 7 + 1) * n + (n + 1) * a)
    params = torch.randn(c.num_params)
    parts = c.split(params)
    expected = [(a, 12), (a,)] if n == 0 else [(n, 12), (n,), (a, n), (a,)]
    assert [tuple(part.shape) for part in parts] == expected
    assert torch.equal(c.join(*parts), params)
    assert torch.equal(torch.cat([part.flatten() for part in parts]), params)  # in order, row by row
    population = torch.randn(3, c.num_params)
    parts = c.split(population)
    assert [tuple(part.shape) for part in parts] == [(3, *shape) for shape in expected]
    assert torch.equal(c.join(*parts), population)
    with pytest.raises(ValueError, match="parts"):
        c.join(*parts[:-1])


def test_single_and_population_forms_agree(any_controller):
    c = any_controller
    generator = torch.Generator().manual_seed(0)
    population = torch.randn(4, c.num_params, generator=generator)
    features = torch.randn(4, 6, 12, generator=generator)
    batched = c.logits(population, features)
    assert batched.shape == (4, 6, c.action_dim)
    for p in range(4):
        torch.testing.assert_close(c.logits(population[p], features[p]), batched[p], rtol=1e-5, atol=1e-5)
        # any leading dims in the single form
        single = c.logits(population[p], features[p].reshape(2, 3, 12))
        torch.testing.assert_close(single, batched[p].reshape(2, 3, -1), rtol=1e-5, atol=1e-5)
    actions = c.act(population, features[..., :5], features[..., 5:])
    for p in range(4):
        alone = c.act(population[p], features[p, :, :5], features[p, :, 5:])
        if c.discrete:  # argmax of logits equal up to rounding (no two logits within rounding here)
            assert torch.equal(alone, actions[p])
        else:
            torch.testing.assert_close(alone, actions[p], rtol=1e-5, atol=1e-5)


def test_squashed_actions_are_in_range(any_controller):
    c = any_controller
    generator = torch.Generator().manual_seed(1)
    params = 5 * torch.randn(3, c.num_params, generator=generator)
    actions = c.act(params, 5 * torch.randn(3, 50, 5, generator=generator), torch.rand(3, 50, 7) * 2 - 1)
    if c.discrete:
        assert actions.shape == (3, 50) and actions.dtype == torch.int64
        assert 0 <= actions.min() and actions.max() < c.action_dim and len(actions.unique()) > 1
    else:
        assert actions.shape == (3, 50, 3)
        assert (
            actions[..., 0].abs().max() <= 1 and 0 <= actions[..., 1:].min() and actions[..., 1:].max() <= 1
        )
        assert actions[..., 0].min() < -0.5 and actions[..., 1:].max() > 0.5  # not squashed to a point


def test_hidden_layer_logits_match_a_hand_written_reference():
    c = Controller(5, 7, 3, discrete=False, hidden=4)
    generator = torch.Generator().manual_seed(2)
    w1, b1 = torch.randn(4, 12, generator=generator), torch.randn(4, generator=generator)
    w2, b2 = torch.randn(3, 4, generator=generator), torch.randn(3, generator=generator)
    params = c.join(w1, b1, w2, b2)
    assert params[12 * 4 + 4 + 1 * 4 + 2] == w2[1, 2]  # [W1, b1, W2, b2], row by row
    x = torch.randn(9, 12, generator=generator)
    reference = torch.tanh(x @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(c.logits(params, x), reference)
    population = torch.stack([params, c.join(-w1, b1, 2 * w2, b2)])
    batched = c.logits(population, torch.stack([x, x]))
    torch.testing.assert_close(batched[0], reference)
    torch.testing.assert_close(batched[1], torch.tanh(x @ -w1.T + b1) @ (2 * w2).T + b2)


def test_initial_params_give_a_live_hidden_layer_and_a_neutral_first_action():
    linear = Controller(5, 7, 3, discrete=False)
    assert torch.equal(linear.initial_params(), torch.zeros(linear.num_params))
    c = Controller(5, 7, 3, discrete=False, hidden=4)
    start = c.initial_params()
    w1, b1, w2, b2 = c.split(start)
    assert torch.equal(start, c.initial_params())  # seeded (not from the global generator)
    assert not torch.equal(start, c.initial_params(torch.Generator().manual_seed(1)))
    assert torch.equal(start, c.initial_params(torch.Generator().manual_seed(0)))
    assert b1.eq(0).all() and w2.eq(0).all() and b2.eq(0).all()
    assert w1.ne(0).all() and torch.linalg.matrix_rank(w1) == 4  # distinct hidden units
    assert 0.1 < float(w1.std() * 12**0.5) < 2  # N(0, 1 / (Z + H))
    # the same first action as the linear controller's zeros: g(0) whatever the input
    features = torch.randn(6, 12)
    torch.testing.assert_close(c.logits(start, features), torch.zeros(6, 3))
    # but the hidden units already see the input: perturbing W2 alone makes the actions depend on it
    moved = c.join(w1, b1, torch.ones(3, 4), b2)
    assert c.logits(moved, features).std(0).min() > 0
    assert c.initial_params(scale=0.5).ne(0).all()


def test_a_controller_saved_before_hidden_existed_is_linear_and_hidden_is_checked(tmp_path):
    assert Controller(**{"z_dim": 5, "h_dim": 7, "action_dim": 3, "discrete": False}).hidden == 0
    assert Controller(5, 7, 3, False, 4).to_dict()["hidden"] == 4
    with pytest.raises(ValueError, match="hidden >= 0"):
        Controller(5, 7, 3, False, -1)
    assert load_config(None, [f"runs_dir={tmp_path}", "controller.hidden=4"]).controller.hidden == 4
    with pytest.raises(ConfigError, match="controller.hidden must be at least 0"):
        load_config(None, [f"runs_dir={tmp_path}", "controller.hidden=-1"])

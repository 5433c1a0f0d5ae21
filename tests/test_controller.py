"""The linear controller: flat parameters <-> (W, b), single and population forms against a dense reference,
action squashing, and the memory's action encoding matching the envs' ``encode_action``."""

import numpy as np
import pytest
import torch

from agents.controller import LinearController
from rollouts.envs import action_dim, encode_action
from worldmodel.config import EnvConfig

MARIO = EnvConfig(name="mario", mario_actions="simple")


@pytest.fixture
def car():
    return LinearController(z_dim=5, h_dim=7, action_dim=3, discrete=False)


@pytest.fixture
def mario():
    return LinearController(z_dim=5, h_dim=7, action_dim=action_dim(MARIO), discrete=True)


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
        LinearController(5, 7, 4, discrete=False)

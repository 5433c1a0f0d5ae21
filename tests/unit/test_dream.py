"""The dream, done right (docs/architecture.md): the gymnasium dream env and the batched dream of a
population.

Pinned here: env_checker passes (with render); seeded determinism; alignment (the memory reads (z_t, a_t)
from the state h_t the controller saw, its output gives z_{t+1}, r_t, done_t); sampled z (not the mean) with
the temperature on logits and covariance; the horizon cap; z_0 from real latents with h = 0; the batched
dream equal to a step-by-step reference loop; and the dream env dreaming the batched dream's very dreams
(same seeds, controller and starts: the same z, h, rewards and dones), so the dream video shows the dream the
controller was trained in.

Across two code paths (the memory's full head vs the chosen-component step, a controller on [n] vs [P, n])
floats agree to a tolerance; exact equality only where the same code runs twice.
"""

import warnings
from itertools import product

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from frmdn_worldmodels.data.episodes import save_latents
from frmdn_worldmodels.dream.batched import BatchedDream
from frmdn_worldmodels.dream.dynamics import DreamDynamics, DreamStarts
from frmdn_worldmodels.dream.env import DREAM_ENV_ID, DreamEnv, steps_left, warm_starts
from frmdn_worldmodels.games.envs import action_space
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.models.vae import ConvVAE
from frmdn_worldmodels.runtime.config import EnvConfig, MemoryConfig, load_config

Z, A, H = 6, 3, 12
CAR_ACTIONS = action_space(EnvConfig(name="carracing"))


def tiny_memory(kind="frmdn", rank=2, cond=A, components=3, done_bias=None, seed=0, cls=MemoryModel, **extra):
    """A small memory with every weight perturbed (a fresh flow is the identity, which would hide
    mistakes)."""
    torch.manual_seed(seed)
    config = MemoryConfig(
        kind=kind, hidden=H, components=components, rank=rank, flow_blocks=2, flow_hidden=8, **extra
    )
    memory = cls(Z, cond, config)
    with torch.no_grad():
        for parameter in memory.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        if done_bias is not None:
            memory.done_head.weight.zero_()
            memory.done_head.bias.fill_(done_bias)
    return memory.eval()


def starts(count=4, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, Z)).astype(np.float32), np.full((count, Z), -3.0, np.float32)


def make_dream(memory, action_space=CAR_ACTIONS, **kwargs):
    mu, logvar = starts()
    return DreamEnv(
        memory, mu, logvar, action_space=action_space, **{"horizon": 30, "temperature": 1.15, **kwargs}
    )


def assert_passes_check_env(env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # z is a Gaussian-mixture sample: its box is honestly unbounded, which check_env flags as a style
        # warning
        warnings.filterwarnings("ignore", message=".*infinity")
        check_env(env.unwrapped)


@pytest.mark.parametrize("discrete", [False, True])
def test_dream_env_passes_gymnasium_env_checker_with_render(discrete):
    memory = tiny_memory(kind="rmdn", rank=0, cond=5) if discrete else tiny_memory()
    mu, logvar = starts()
    env = gymnasium.make(
        DREAM_ENV_ID,
        memory=memory,
        initial_mu=mu,
        initial_logvar=logvar,
        action_space=spaces.Discrete(5) if discrete else CAR_ACTIONS,
        horizon=20,
        temperature=1.15,
        vae=ConvVAE(Z),
        render_mode="rgb_array",
    )
    assert env.spec.id == DREAM_ENV_ID and isinstance(env.unwrapped, DreamEnv)
    assert_passes_check_env(env)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8


def rollout(env, seed, steps=12):
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    trajectory = [obs]
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        trajectory.append(np.append(obs, [reward, terminated, truncated]))
        if terminated or truncated:
            break
    return trajectory


def test_dream_env_is_deterministic_given_the_seed():
    env = make_dream(tiny_memory(done_bias=-20.0))
    first, again, other = rollout(env, 3), rollout(env, 3), rollout(env, 4)
    assert len(first) == 13
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[5], other[5])


@pytest.mark.parametrize("done_bias", [-20.0, 0.5])
def test_dream_env_alignment_reads_z_a_from_the_h_the_controller_saw(done_bias):
    """Against the memory's own ``step`` and ``sample``, fed the env's observations and replaying its
    draws."""
    memory = tiny_memory(done_bias=done_bias)
    env = make_dream(memory, temperature=1.3, horizon=6)
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    assert np.all(obs[Z:] == 0)  # a first frame: h_0 = c_0 = 0
    state, replay, ended = memory.initial_state(1), torch.Generator(), []
    for _ in range(6):
        action = env.action_space.sample()
        replay.set_state(env.unwrapped._generator.get_state())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        with torch.no_grad():
            # step t reads z_t and a_t, starting from h_t: exactly the observation the controller acted on
            np.testing.assert_allclose(obs[Z:], state[0][0, 0].numpy(), rtol=1e-5, atol=1e-6)
            out, state = memory.step(torch.from_numpy(obs[None, :Z]), torch.from_numpy(action[None]), state)
            # its output predicts z_{t+1} (a sample of that very output, at the env's temperature), then r_t
            # and done_t of the transition to that very z_{t+1}; the temperature leaves done alone
            next_z = memory.sample(out, 1.3, replay)
            np.testing.assert_allclose(next_obs[:Z], next_z[0].numpy(), rtol=1e-5, atol=1e-5)
            expected_reward, done_logit = memory.outcome(out, next_z)
            assert reward == pytest.approx(float(expected_reward[0]), rel=1e-5, abs=1e-6)
            assert terminated == bool(torch.rand(1, generator=replay)[0] < torch.sigmoid(done_logit[0]))
        # h_{t+1} is the LSTM output after reading (z_t, a_t)
        np.testing.assert_allclose(next_obs[Z:], out.hidden[0].numpy(), rtol=1e-5, atol=1e-6)
        ended.append(terminated)
        if terminated or truncated:
            break
        obs = next_obs
    # a done logit of -20 never ends the dream (truncated at the horizon); sigma(0.5 / 1.3) = 0.6 soon does
    assert (ended == [False] * 6) if done_bias < 0 else ended[-1]


def test_dream_feeds_sampled_z_not_the_mixture_mean():
    memory = tiny_memory(done_bias=-20.0)
    mu, _ = starts()
    action = np.array([0.1, 0.5, 0.0], np.float32)
    next_z = {}
    for temperature in (1.0, 0.0):
        env = DreamEnv(
            memory, mu, None, action_space=CAR_ACTIONS, horizon=5, temperature=temperature, use_mu=True
        )
        draws = []
        for seed in range(20):
            _, info = env.reset(seed=seed)
            if info["start_index"] == 0:
                draws.append(env.step(action)[0][:Z])
        next_z[temperature] = np.stack(draws)
    assert len(next_z[1.0]) >= 3
    # tau = 0 is the mode: always the same z_1 from the same z_0; tau = 1 draws differ from it and each other
    assert np.ptp(next_z[0.0], axis=0).max() == 0
    assert np.ptp(next_z[1.0], axis=0).min() > 1e-3
    assert not np.any(np.all(next_z[1.0] == next_z[0.0][0], axis=1))


def test_dream_starts_from_real_first_frames_with_zero_state():
    memory = tiny_memory()
    mu, logvar = starts()
    env = DreamEnv(memory, mu, logvar, action_space=CAR_ACTIONS, use_mu=True)
    seen = set()
    for seed in range(12):
        obs, info = env.reset(seed=seed)
        np.testing.assert_array_equal(obs[:Z], mu[info["start_index"]])
        assert np.all(obs[Z:] == 0)
        seen.add(info["start_index"])
    assert len(seen) > 1
    # without use_mu: a posterior sample around the frame's mean, std exp(logvar / 2)
    env = DreamEnv(memory, mu, logvar, action_space=CAR_ACTIONS, use_mu=False)
    obs, info = env.reset(seed=0)
    offset = (obs[:Z] - mu[info["start_index"]]) / np.exp(0.5 * logvar[0])
    assert 0 < np.abs(offset).max() < 5
    dream = BatchedDream(memory, controller(), mu, logvar, horizon=5, use_mu=True)
    first = dream.dynamics.start(16, torch.Generator().manual_seed(0))
    assert all(any(np.array_equal(row, start) for start in mu) for row in first.z.numpy())
    np.testing.assert_array_equal(first.z.numpy(), mu[first.start.numpy()])
    assert first.h.eq(0).all() and first.cell.eq(0).all()


def test_dreams_are_capped_at_the_horizon_and_end_when_done():
    mu, logvar = starts()
    never = tiny_memory(done_bias=-50.0)
    env = DreamEnv(never, mu, logvar, action_space=CAR_ACTIONS, horizon=7)
    env.reset(seed=0)
    flags = [env.step(CAR_ACTIONS.sample())[2:4] for _ in range(7)]
    assert flags[:-1] == [(False, False)] * 6 and flags[-1] == (False, True)
    params = torch.randn(3, controller().num_params)
    result = BatchedDream(never, controller(), mu, logvar, horizon=7).rollout(
        params, 2, torch.Generator().manual_seed(0)
    )
    assert result.lengths.eq(7).all()
    always = tiny_memory(done_bias=50.0)
    env = DreamEnv(always, mu, logvar, action_space=CAR_ACTIONS, horizon=7)
    env.reset(seed=0)
    assert env.step(CAR_ACTIONS.sample())[2:4] == (True, False)
    result = BatchedDream(always, controller(), mu, logvar, horizon=7).rollout(
        params, 2, torch.Generator().manual_seed(0)
    )
    assert result.lengths.eq(1).all()


def controller(discrete=False, actions=A, hidden=0, sample=False):
    return Controller(Z, H, actions, discrete, hidden, sample)


def reference_returns(memory, ctrl, params, z0, horizon, h0=None, c0=None, uniforms=None):
    """Step-by-step dreams with ``MemoryModel.step``/``sample`` at tau = 0 (deterministic): [P, R] returns,
    lengths. Each dream r starts from z0[r] and the LSTM state (h0[r], c0[r]) (zeros if not given); a
    sampling controller draws step t's action at ``uniforms[t][p, r]``."""
    population, rollouts = params.shape[0], z0.shape[0]
    returns, lengths = torch.zeros(population, rollouts), torch.zeros(population, rollouts, dtype=torch.long)
    with torch.no_grad():
        for p in range(population):
            for r in range(rollouts):
                z, state = z0[r : r + 1], memory.initial_state(1)
                if h0 is not None:
                    state = (h0[r].reshape(1, 1, -1).clone(), c0[r].reshape(1, 1, -1).clone())
                for t in range(horizon):
                    draw = None if uniforms is None else uniforms[t][p, r : r + 1]
                    action = ctrl.act(params[p], z, state[0][0], draw)  # h_t: before reading (z_t, a_t)
                    out, state = memory.step(z, ctrl.encode(action), state)
                    z = memory.sample(out, temperature=0.0)
                    reward, done_logit = memory.outcome(out, z)
                    returns[p, r] += reward[0]
                    lengths[p, r] += 1
                    if memory.done_probability(done_logit[0]) > 0.5:
                        break
    return returns, lengths


@pytest.mark.parametrize(
    "kind, rank, discrete, done_bias, extra",
    [
        ("frmdn", 2, False, -0.75, {}),
        (
            "frmdn",
            3,
            False,
            -0.25,
            {"flow_context": True, "diag_activation": "exp", "diag_clamp": [0.1, 1.9]},
        ),
        ("rmdn", 0, True, -0.25, {}),
        ("frmdn", 2, True, 0.0, {"warm": True}),
        # Ha's controller with a hidden layer: the population form against the single-vector one
        ("frmdn", 2, False, -0.75, {"controller_hidden": 4}),
        ("frmdn", 2, True, 0.0, {"warm": True, "controller_hidden": 3}),
        # a sampling controller: each step's actions drawn from the dream's generator before the step
        ("frmdn", 2, True, 0.0, {"sample": True}),
    ],
)
def test_batched_dream_equals_a_step_by_step_reference(kind, rank, discrete, done_bias, extra):
    extra = dict(extra)  # the parameters are shared between runs of the test
    warm, hidden = extra.pop("warm", False), extra.pop("controller_hidden", 0)
    sample = extra.pop("sample", False)
    actions = 4 if discrete else A
    memory = tiny_memory(kind=kind, rank=rank, cond=actions, done_bias=None, **extra)
    with torch.no_grad():  # some dreams end early, others run to the horizon (done reads h_{t+1} alone)
        memory.done_head.weight.zero_()
        memory.done_head.weight[:, :H].copy_(torch.linspace(-1.0, 1.0, H))
        memory.done_head.bias.fill_(done_bias)
    ctrl = controller(discrete, actions, hidden, sample)
    torch.manual_seed(5)
    params = torch.randn(4, ctrl.num_params)
    mu, _ = starts()
    # warm: every start frame comes with its own nonzero LSTM state (h in [-1, 1] as an LSTM's)
    state = (
        (
            np.tanh(np.random.default_rng(3).normal(size=(len(mu), H))).astype(np.float32),
            np.random.default_rng(4).normal(size=(len(mu), H)).astype(np.float32),
        )
        if warm
        else None
    )
    dream = BatchedDream(
        memory, ctrl, mu, None, horizon=12, temperature=0.0, use_mu=True, initial_state=state
    )
    result = dream.rollout(params, 3, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    first = dream.dynamics.start(3, generator)  # the rollout's starts: the same draws
    assert torch.equal(result.starts, first.start) and bool(first.h.ne(0).any()) == warm
    # at tau 0 the steps draw nothing: a sampling controller's draws follow the starts' in the generator
    uniforms = [ctrl.uniforms((4, 3), generator) for _ in range(12)] if sample else None
    returns, lengths = reference_returns(memory, ctrl, params, first.z, 12, first.h, first.cell, uniforms)
    # integers: only a done logit within float error of 0 could tell the two paths apart
    assert torch.equal(result.lengths, lengths)
    assert lengths.min() < 12 and lengths.float().mean() > 2, lengths
    torch.testing.assert_close(result.returns, returns, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.fitness, returns.mean(1), atol=1e-4, rtol=1e-4)


def test_chosen_component_head_equals_the_memory_heads():
    memory = tiny_memory(rank=3, components=4, diag_clamp=[0.2, 3.0])
    dynamics = DreamDynamics(memory, *starts(), horizon=3)
    hidden = torch.randn(50, H)
    component = torch.randint(4, (50,))
    mu, diag, u = dynamics.chosen_component(hidden, component)
    out = memory.heads(hidden)
    rows = torch.arange(50)
    torch.testing.assert_close(mu, out.mu[rows, component])
    torch.testing.assert_close(diag, out.diag[rows, component])
    torch.testing.assert_close(u, out.u[rows, component])


class ReversedActionMemory(MemoryModel):
    """A new memory, unknown to dream/: its LSTM reads -a_t, its D_k is 0.5 + raw^2; it lays out its own fused
    step (the LSTM's action weights negated) and its own component parameters."""

    def recur(self, y, cond, state=None):
        return super().recur(y, -cond, state)

    def positive_diagonal(self, raw):
        return 0.5 + raw.square()

    def fused_step(self):
        weights = super().fused_step()
        weights.gate_weight[self.target_dim + self.config.hidden :].neg_()
        return weights


def test_a_new_memory_brings_its_own_dream():
    """The dream takes its step from the memory (``fused_step``, ``component_parameters``): a subclass with
    another recurrence and another D_k dreams its own law, with no change to dream/."""
    memory = tiny_memory(rank=2, cls=ReversedActionMemory)
    with torch.no_grad():  # some dreams end early, others run to the horizon (done reads h_{t+1} alone)
        memory.done_head.weight.zero_()
        memory.done_head.weight[:, :H].copy_(torch.linspace(-1.0, 1.0, H))
        memory.done_head.bias.fill_(-0.75)
    ctrl = controller()
    params = torch.randn(4, ctrl.num_params, generator=torch.Generator().manual_seed(5))
    mu, _ = starts()
    dream = BatchedDream(memory, ctrl, mu, None, horizon=12, temperature=0.0, use_mu=True)
    result = dream.rollout(params, 3, torch.Generator().manual_seed(2))
    first = dream.dynamics.start(3, torch.Generator().manual_seed(2))
    returns, lengths = reference_returns(memory, ctrl, params, first.z, 12)  # MemoryModel.step and .sample
    assert torch.equal(result.lengths, lengths) and lengths.min() < 12
    torch.testing.assert_close(result.returns, returns, atol=1e-4, rtol=1e-4)
    # the chosen component's D_k is the new memory's, not the softplus of MemoryModel
    hidden, component = torch.randn(50, H), torch.randint(3, (50,))
    _, diag, _ = dream.dynamics.chosen_component(hidden, component)
    with torch.no_grad():
        expected = memory.heads(hidden).diag[torch.arange(50), component]
    torch.testing.assert_close(diag, expected)
    assert diag.min() >= 0.5


@pytest.mark.parametrize("temperature", [0.5, 1.6])
def test_batched_sampler_draws_from_the_memory_distribution(temperature):
    """Component from softmax(logits / tau), covariance x tau, then the flow: same law as
    ``MemoryModel.sample``."""
    memory = tiny_memory(rank=2, components=3)
    with torch.no_grad():
        memory.mixture_head.bias[:3] = torch.tensor([1.0, 0.0, -0.5])  # unequal weights: tau matters
    dynamics = DreamDynamics(memory, *starts(), horizon=3, temperature=temperature)
    count = 40_000
    hidden = torch.randn(1, H).expand(count, H).contiguous()
    with torch.no_grad():
        out = memory.heads(hidden)
        reference = memory.sample(out, temperature, torch.Generator().manual_seed(0))
        fast = dynamics.sample_next(hidden, out.logit_pi, torch.Generator().manual_seed(1))
    spread = reference.std(0)
    torch.testing.assert_close(fast.mean(0), reference.mean(0), atol=float(0.05 * spread.max()), rtol=0)
    torch.testing.assert_close(fast.std(0), spread, atol=0, rtol=0.05)
    centered_fast, centered_ref = fast - fast.mean(0), reference - reference.mean(0)
    cov_fast, cov_ref = centered_fast.T @ centered_fast / count, centered_ref.T @ centered_ref / count
    assert (cov_fast - cov_ref).abs().max() < 0.06 * cov_ref.diagonal().max()


def test_batched_dream_is_reproducible_and_scores_each_candidate():
    memory = tiny_memory(done_bias=-3.0)
    dream = BatchedDream(memory, controller(), *starts(), horizon=15, temperature=1.15)
    params = torch.randn(6, controller().num_params)
    first = dream.rollout(params, 5, torch.Generator().manual_seed(7))
    again = dream.rollout(params, 5, torch.Generator().manual_seed(7))
    assert torch.equal(first.returns, again.returns) and first.returns.shape == (6, 5)
    assert dream.fitness(params, 5, torch.Generator().manual_seed(7)).shape == (6,)
    other = dream.rollout(params, 5, torch.Generator().manual_seed(8))
    assert not torch.equal(first.returns, other.returns)
    assert 1 <= first.lengths.min() and first.lengths.float().mean() < 15  # dreams end at sampled dones


def test_warm_starts_carry_the_memory_state_reached_by_reading_the_real_episode(tmp_path):
    memory = tiny_memory()
    rng = np.random.default_rng(0)
    episodes = []
    for index, steps in enumerate([9, 4, 13]):
        mu = rng.normal(size=(steps + 1, Z)).astype(np.float32)
        actions = rng.uniform(size=(steps, A)).astype(np.float32)
        save_latents(
            tmp_path / f"ep_{index:05d}.npz",
            mu,
            np.full_like(mu, -2.0),
            actions,
            np.zeros(steps, np.float32),
            np.eye(1, steps, steps - 1, dtype=bool)[0],
        )
        episodes.append((mu, actions))
    warm = warm_starts(tmp_path, memory, limit=12, use_mu=True, seed=0)
    mu, logvar, (hidden, cell) = warm.mu, warm.logvar, warm.state
    # 12 starts over 3 episodes: 4 distinct frames each (all 4 of the 4-step one), never a final observation
    assert mu.shape == (12, Z) and hidden.shape == cell.shape == (12, H) and np.all(logvar == -2.0)
    found = []
    for row, z in enumerate(mu):
        ((episode, frame),) = [
            (e, t) for e, (m, _) in enumerate(episodes) for t in range(len(m)) if np.array_equal(m[t], z)
        ]
        assert frame < len(episodes[episode][1]) and warm.times[row] == frame
        found.append((episode, frame))
        # reference: MemoryModel.step through the episode's real (z_<t, a_<t)
        state = memory.initial_state(1)
        with torch.no_grad():
            for t in range(frame):
                _, state = memory.step(
                    torch.from_numpy(episodes[episode][0][t : t + 1]),
                    torch.from_numpy(episodes[episode][1][t : t + 1]),
                    state,
                )
        np.testing.assert_allclose(hidden[row], state[0][0, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(cell[row], state[1][0, 0].numpy(), atol=1e-5)
    assert len(set(found)) == 12 and sorted(f for e, f in found if e == 1) == [0, 1, 2, 3]
    assert any(frame == 0 for _, frame in found) and any(frame > 5 for _, frame in found)
    # at most `limit` episodes are read, and the draw is seeded
    few = warm_starts(tmp_path, memory, limit=2, use_mu=False, seed=1)
    assert len(few.mu) == 2 and not np.array_equal(few.state[0][0], few.state[0][1])
    np.testing.assert_array_equal(
        few.state[0], warm_starts(tmp_path, memory, limit=2, use_mu=False, seed=1).state[0]
    )
    # the dream env begins each dream in the start frame's state
    env = DreamEnv(memory, mu, logvar, action_space=CAR_ACTIONS, use_mu=True, initial_state=(hidden, cell))
    for seed in range(5):
        obs, info = env.reset(seed=seed)
        np.testing.assert_array_equal(obs[:Z], mu[info["start_index"]])
        np.testing.assert_allclose(obs[Z:], hidden[info["start_index"]])
    with pytest.raises(ValueError, match="initial_state"):
        DreamEnv(memory, mu, logvar, action_space=CAR_ACTIONS, initial_state=(hidden[:3], cell[:3]))


def warm_state(count, seed=3):
    """(h, c) ``[count, H]`` of a warm start: h in [-1, 1] as an LSTM's."""
    rng = np.random.default_rng(seed)
    return np.tanh(rng.normal(size=(count, H))).astype(np.float32), rng.normal(size=(count, H)).astype(
        np.float32
    )


def drive(env, ctrl, params, seed=None, options=None):
    """One dream of ``env`` driven by the controller as ``stages.evaluate.run_dream`` drives it: observations
    [T + 1, Z + H], rewards [T], dones [T] and the reset's info."""
    obs, info = env.reset(seed=seed, options=options)
    observations, rewards, dones = [obs], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        features = torch.as_tensor(obs)
        action = ctrl.act(params, features[None, :Z], features[None, Z:])[0]
        obs, reward, terminated, truncated, _ = env.step(int(action) if ctrl.discrete else action.numpy())
        observations.append(obs)
        rewards.append(reward)
        dones.append(terminated)
    return np.stack(observations), np.array(rewards, np.float32), np.array(dones), info


def twin_dreams(kind, rank, start, temperature, probe, use_mu=False, horizon=25, **regularisers):
    """A DreamEnv, a BatchedDream of one memory with the same starts and settings, and their controller.
    Mario's dreams (discrete actions) start anywhere, as its configs do; CarRacing's at first frames.

    Some dreams must end within a few steps and others run long. Sampled dones (tau > 0) spread the ends by
    themselves; at tau = 0 a dream ends where w . h_{t+1} first exceeds -b, so b is set from the dreams the
    test compares: ``probe(env, dream)`` records them with no end ([D, T + 1, Z + H] observations), and half
    of them cross -b within 6 steps. (A dream's steps before its end do not depend on b: done is a step's last
    draw.) ``regularisers``: ``memory.dropout`` (which the calibration at tau = 0 ignores) and
    ``memory.ensemble`` (every member gets the same done head).
    """
    discrete = start == "any"
    actions = 5 if discrete else A
    memory = tiny_memory(
        kind=kind,
        rank=rank,
        cond=actions,
        **({"flow_context": True} if kind == "frmdn" else {}),
        **regularisers,
    )
    weight = torch.linspace(-1.0, 1.0, H)
    mu, logvar = starts()
    ctrl = controller(discrete, actions)
    settings = {
        "horizon": horizon,
        "temperature": temperature,
        "use_mu": use_mu,
        "initial_state": warm_state(len(mu)) if start == "any" else None,
    }
    action_space = spaces.Discrete(actions) if discrete else CAR_ACTIONS

    def build(bias):
        with torch.no_grad():  # done reads h_{t+1} alone here (the z_{t+1} part is zero)
            memory.done_head.weight.zero_()
            memory.done_head.weight[:, :H].copy_(weight)
            memory.done_head.bias.fill_(bias)
        env = DreamEnv(memory, mu, logvar, action_space=action_space, **settings)
        return env, BatchedDream(memory, ctrl, mu, logvar, **settings)

    if temperature > 0:
        return (*build(-2.5), ctrl)
    peaks = (probe(*build(-1e4))[:, 1:7, Z:] @ weight).amax(1).sort().values
    # -b midway across the widest gap between the middle half of the peaks: no dream's logit sits at the
    # threshold, where the two code paths' last bits could end one and not the other
    quarter = len(peaks) // 4
    low = quarter + int((peaks[quarter + 1 : -quarter] - peaks[quarter : -quarter - 1]).argmax())
    return (*build(-float(peaks[low] + peaks[low + 1]) / 2), ctrl)


def candidates(start, count, seed):
    """``count`` controllers' parameters for the game ``twin_dreams`` pairs with ``start``."""
    ctrl = controller(start == "any", 5 if start == "any" else A)
    return 0.5 * torch.randn(count, ctrl.num_params, generator=torch.Generator().manual_seed(seed))


def assert_same_dream(trace, p, r, observations, rewards, dones):
    """Dream (p, r) of a recorded batched rollout is the env's dream (z, h, rewards, dones)."""
    steps = int(trace.lengths[p, r])
    assert steps == len(rewards)
    np.testing.assert_allclose(
        trace.observations[p, r, : steps + 1].numpy(), observations, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(trace.rewards[p, r, :steps].numpy(), rewards, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(trace.dones[p, r, :steps].numpy(), dones)
    assert float(trace.returns[p, r]) == pytest.approx(float(rewards.sum()), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.15])
@pytest.mark.parametrize("start", ["first", "any"])
@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("kind", ["rmdn", "frmdn"])
def test_dream_env_dreams_the_dreams_the_controller_is_trained_in(kind, rank, start, temperature):
    """Same seed, candidate and start: the env's dream (as the dream video plays it) is the batched dream's,
    the batched dream of one rollout given a generator seeded with the env's ``dream_seed``."""
    check_twin_dreams(kind, rank, start, temperature)


@pytest.mark.parametrize(
    "kind, rank, start, temperature, regularisers",
    [
        ("frmdn", 2, "first", 1.15, {"dropout": 0.3}),
        ("rmdn", 0, "any", 1.15, {"dropout": 0.5}),
        ("frmdn", 2, "any", 0.0, {"ensemble": 3}),
        ("rmdn", 2, "first", 0.0, {"ensemble": 2}),
        ("frmdn", 0, "first", 1.15, {"ensemble": 3}),
        ("frmdn", 2, "any", 1.15, {"ensemble": 3, "dropout": 0.3}),
    ],
)
def test_dream_env_dreams_the_batched_dreams_with_dropout_and_an_ensemble(
    kind, rank, start, temperature, regularisers
):
    """The same with the dream's regularisers: the env's dream has the batched dream's dropout mask and
    member (drawn from the same seed), so the dream video still shows a dream the controller trained in."""
    check_twin_dreams(kind, rank, start, temperature, **regularisers)


def check_twin_dreams(kind, rank, start, temperature, **regularisers):
    """Drive the env and the batched dream of one rollout with the same seeds and candidates (4 x 3 dreams)
    and compare each dream's z, h, rewards, dones, start frame and ensemble member."""
    params = candidates(start, 3, seed=0)
    dreams = list(product(range(4), params))

    def batched(env, dream, candidate, seed):
        info = env.reset(seed=seed)[1]
        return dream.rollout(
            candidate[None], 1, torch.Generator().manual_seed(info["dream_seed"]), record=True
        )

    def probe(env, dream):
        return torch.cat([batched(env, dream, candidate, seed).observations[0] for seed, candidate in dreams])

    env, dream, ctrl = twin_dreams(kind, rank, start, temperature, probe, **regularisers)
    lengths, frames, members = [], set(), set()
    for seed, candidate in dreams:
        observations, rewards, dones, info = drive(env, ctrl, candidate, seed=seed)
        trace = batched(env, dream, candidate, seed)
        assert int(trace.starts[0]) == info["start_index"]
        assert_same_dream(trace, 0, 0, observations, rewards, dones)
        lengths.append(len(rewards))
        frames.add(info["start_index"])
        if regularisers.get("ensemble", 1) > 1:
            assert int(trace.members[0]) == info["member"]
            members.add(info["member"])
        else:
            assert trace.members is None and "member" not in info
    assert min(lengths) < 25 and max(lengths) > 6 and len(frames) > 1, (lengths, frames)
    assert len(members) > 1 or "ensemble" not in regularisers, members  # 4 seeds: 4 draws of the member


@pytest.mark.parametrize("kind, rank, start", [("frmdn", 2, "any"), ("rmdn", 0, "first")])
def test_every_dream_of_a_population_batch_is_the_dream_env_dream_from_its_start(kind, rank, start):
    """At tau = 0 with z_0 = mu a dream is fixed by its start and its candidate: each of the P x R dreams of
    one batch (its component groups span many dreams) is the env's dream from that start frame."""
    params = candidates(start, 3, seed=1)

    def batched(env, dream):
        return dream.rollout(params, 4, torch.Generator().manual_seed(2), record=True)

    env, dream, ctrl = twin_dreams(
        kind, rank, start, 0.0, lambda *twins: batched(*twins).observations.flatten(0, 1), use_mu=True
    )
    trace = batched(env, dream)
    assert len(set(trace.starts.tolist())) > 1
    for p, r in product(range(3), range(4)):
        observations, rewards, dones, info = drive(
            env, ctrl, params[p], options={"start_index": int(trace.starts[r])}
        )
        assert info["start_index"] == int(trace.starts[r])
        assert_same_dream(trace, p, r, observations, rewards, dones)
    assert trace.lengths.min() < 25 and trace.lengths.max() > 6, trace.lengths


# ---------------------------------------------------------------- dream regularisers: dropout, an ensemble


def reference_dream(memory, ctrl, params, z0, horizon, mask=None):
    """One dream at tau = 0, step by step with ``MemoryModel``: the LSTM's step from the h the controller
    saw, the heads on ``h_{t+1} * mask`` (the dream's fixed dropout mask at every step, or none), the mode of
    their mixture through the inverse flow (context: what the heads read). Observations [T + 1, Z + H] (the
    undropped h), rewards [T] and dones [T] up to the end."""
    z, state = z0[None], memory.initial_state(1)
    observations, rewards, dones = [torch.cat([z[0], state[0][0, 0]])], [], []
    with torch.no_grad():
        for _ in range(horizon):
            action = ctrl.act(params, z, state[0][0])
            _, state = memory.step(z, ctrl.encode(action), state)
            hidden = state[0][0]
            out = memory.heads(hidden if mask is None else hidden * mask)
            z = memory.sample(out, temperature=0.0)
            reward, done_logit = memory.outcome(out, z)
            observations.append(torch.cat([z[0], hidden[0]]))
            rewards.append(float(reward[0]))
            dones.append(bool(memory.done_probability(done_logit[0]) > 0.5))
            if dones[-1]:
                break
    return torch.stack(observations).numpy(), np.array(rewards, np.float32), np.array(dones)


@pytest.mark.parametrize(
    "kind, regularisers",
    [
        ("frmdn", {"dropout": 0.5, "flow_context": True}),
        ("rmdn", {"dropout": 0.3}),
        ("frmdn", {"ensemble": 3, "flow_context": True}),
        ("rmdn", {"ensemble": 3}),
        ("frmdn", {"ensemble": 3, "dropout": 0.3, "flow_context": True}),
    ],
)
def test_dreams_with_dropout_and_an_ensemble_equal_a_step_by_step_reference(kind, regularisers):
    """Each batched dream (P candidates x R rollouts at tau = 0, z_0 = mu) is the dream of its member alone
    (``MemoryModel.member_model``: a one-member memory built from that member's weights) with its own
    dropout mask, fixed for the whole dream, on what the heads read; the controller reads the undropped h."""
    members = regularisers.get("ensemble", 1)
    memory = tiny_memory(kind=kind, rank=2, **regularisers)
    with torch.no_grad():  # member 1 (of an ensemble) ends every dream at once, the others never do
        memory.done_head.weight.zero_()
        memory.done_head.bias.copy_(torch.tensor([-20.0, 20.0, -20.0][:members]))
    ctrl = controller()
    params = 0.5 * torch.randn(2, ctrl.num_params, generator=torch.Generator().manual_seed(0))
    mu, _ = starts()
    dream = BatchedDream(memory, ctrl, mu, None, horizon=8, temperature=0.0, use_mu=True)
    trace = dream.rollout(params, 6, torch.Generator().manual_seed(4), record=True)
    first = dream.dynamics.start(6, torch.Generator().manual_seed(4))  # the rollout's draws
    assert torch.equal(trace.starts, first.start)
    if members > 1:
        assert torch.equal(trace.members, first.member) and set(trace.members.tolist()) == {0, 1, 2}
        assert torch.equal(trace.lengths.eq(1), trace.members.eq(1).expand(2, -1))  # each its own done head
    singles = [memory.member_model(m) for m in range(members)]
    member = [0] * 6 if first.member is None else first.member.tolist()
    mask = [None] * 6 if first.head_mask is None else first.head_mask
    for p, r in product(range(2), range(6)):
        reference = reference_dream(singles[member[r]], ctrl, params[p], first.z[r], 8, mask[r])
        assert_same_dream(trace, p, r, *reference)
    # the mask and the member matter: without the mask, or in another member, a dream is another one
    r = member.index(0)  # a dream of member 0, which runs to the horizon
    # one member: the same dream without its mask; an ensemble: the same dream (and mask) in member 2
    other = reference_dream(singles[-1], ctrl, params[0], first.z[r], 8, mask[r] if members > 1 else None)[0]
    assert not np.allclose(other[:, :Z], trace.observations[0, r, :, :Z].numpy(), atol=1e-3)


def test_dropout_masks_and_members_are_drawn_per_dream_at_its_start():
    memory = tiny_memory(dropout=0.25, ensemble=3)
    dynamics = DreamDynamics(memory, *starts(), horizon=5)
    batch = dynamics.start(64, torch.Generator().manual_seed(0))
    # one inverted-dropout mask per dream: 0 or 1 / (1 - p), a fraction p of zeros, different dreams apart
    mask = batch.head_mask
    assert mask.shape == (64, H)
    torch.testing.assert_close(mask.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert 0.18 < float((mask == 0).float().mean()) < 0.32
    assert len({tuple(row) for row in mask.tolist()}) > 60
    # the members: balanced over the batch (64 = 21 + 21 + 22), each dream's uniform over the three
    assert sorted(torch.bincount(batch.member, minlength=3).tolist()) == [21, 21, 22]
    firsts = torch.stack([dynamics.start(2, torch.Generator().manual_seed(s)).member[0] for s in range(600)])
    assert (torch.bincount(firsts, minlength=3) - 200).abs().max() < 45
    # the candidates dream the same dreams: repeat copies each dream's mask and member
    repeated = batch.repeat(3)

    def copied() -> bool:
        return torch.equal(repeated.head_mask, mask.repeat(3, 1)) and torch.equal(
            repeated.member, batch.member.repeat(3)
        )

    assert copied()
    # fixed for the dream: stepping changes neither
    repeated.action[:] = 0.3
    with torch.inference_mode():
        for _ in range(3):
            dynamics.step(repeated, torch.Generator().manual_seed(1))
    assert copied()
    # and the env's dream has one too, reproducible from its seed, fixed over its steps
    env = DreamEnv(memory, *starts(), action_space=CAR_ACTIONS, horizon=5, temperature=0.0, use_mu=True)
    drawn = []
    for seed in (0, 1, 0):
        info = env.reset(seed=seed, options={"start_index": 0})[1]
        drawn.append((env.unwrapped._dream.head_mask.clone(), info["member"]))
    assert torch.equal(drawn[0][0], drawn[2][0]) and drawn[0][1] == drawn[2][1]
    assert not torch.equal(drawn[0][0], drawn[1][0])


def test_without_dropout_or_an_ensemble_the_dream_draws_what_it_always_drew():
    """dropout 0 and one member: no mask, no member, and the start consumes the generator exactly as the
    dream before these switches (start frames, then the z_0 noise), so every seed gives the old dream."""
    memory = tiny_memory()
    assert memory.dropout is None and memory.ensemble == 1
    dynamics = DreamDynamics(memory, *starts(), horizon=5)
    generator = torch.Generator().manual_seed(3)
    batch = dynamics.start(5, generator)
    assert batch.head_mask is None and batch.member is None and batch.features is None
    reference = torch.Generator().manual_seed(3)
    torch.randint(4, (5,), generator=reference)
    torch.randn((5, Z), generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())
    repeated = batch.repeat(2)
    assert repeated.head_mask is None and repeated.member is None
    rollouts = BatchedDream(memory, controller(), *starts(), horizon=3).rollout(
        torch.zeros(2, controller().num_params), 2, torch.Generator().manual_seed(0)
    )
    assert rollouts.members is None


def test_dream_env_with_dropout_and_an_ensemble_passes_the_env_checker():
    mu, logvar = starts()
    env = gymnasium.make(
        DREAM_ENV_ID,
        memory=tiny_memory(dropout=0.3, ensemble=2),
        initial_mu=mu,
        initial_logvar=logvar,
        action_space=CAR_ACTIONS,
        horizon=20,
        temperature=1.15,
        vae=ConvVAE(Z),
        render_mode="rgb_array",
    )
    assert_passes_check_env(env)


# ------------------------------------------------------- the game's rules: where dreams end, what they pay


def test_a_dream_from_step_t_ends_where_the_real_game_would():
    """A dream started at step t of a real episode has the steps the game had left from there (capped at the
    horizon), in the env and the batched dream alike; ``steps_left`` reads them off the start frames."""
    never = tiny_memory(done_bias=-50.0)
    mu, logvar = starts()
    left = np.array([3, 7, 20, 1])
    expected = np.minimum(left, 10)
    env = DreamEnv(never, mu, logvar, action_space=CAR_ACTIONS, horizon=10, steps_left=left)
    for index, steps in enumerate(expected):
        env.reset(seed=index, options={"start_index": index})
        flags = [env.step(CAR_ACTIONS.sample())[2:4] for _ in range(steps)]
        assert flags == [(False, False)] * (steps - 1) + [(False, True)]
    dream = BatchedDream(never, controller(), mu, logvar, horizon=10, steps_left=left)
    result = dream.rollout(torch.randn(3, controller().num_params), 16, torch.Generator().manual_seed(0))
    assert set(result.starts.tolist()) == {0, 1, 2, 3}
    assert torch.equal(result.lengths, torch.as_tensor(expected)[result.starts].expand(3, -1))
    cfg = load_config(None, ["env.max_steps=200"])
    at = DreamStarts(mu[:3], logvar[:3], None, np.array([0, 5, 199]))
    np.testing.assert_array_equal(steps_left(cfg, at), [200, 195, 1])


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_the_temperature_leaves_the_end_of_a_dream_alone(temperature):
    """tau divides the mixture logits and widens the covariance, never the done head's chance: with a done
    chance of 0.1 a step, a tenth of the dreams end at their first step at any temperature."""
    memory = tiny_memory(done_bias=float(np.log(0.1 / 0.9)))
    mu, logvar = starts()
    dream = BatchedDream(memory, controller(), mu, logvar, horizon=1, temperature=temperature)
    params = torch.zeros(1, controller().num_params)
    trace = dream.rollout(params, 6000, torch.Generator().manual_seed(1), record=True)
    ended = float(trace.dones.float().mean())
    assert ended == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("horizon, weight", [(1, 1.0), (4, 1.0), (1, 30.0), (6, 30.0)])
def test_a_weighted_horizon_head_dreams_the_per_step_hazard(horizon, weight):
    """A done head trained with targets on the last H steps and positives weighted by w says
    logit = log w + logit(1 - (1 - lambda)^H) for a per-step hazard lambda: the dream undoes both, so its
    dreams last as long as the data's episodes, E[min(G, T)] = (1 - (1 - lambda)^T) / lambda."""
    hazard, steps = 0.05, 60
    within = 1 - (1 - hazard) ** horizon
    logit = float(np.log(weight) + np.log(within / (1 - within)))
    memory = tiny_memory(done_bias=logit)
    memory.done_pos_weight, memory.done_horizon = weight, horizon
    assert float(memory.done_probability(torch.tensor(logit))) == pytest.approx(hazard, rel=1e-5)
    mu, logvar = starts()
    dream = BatchedDream(memory, controller(), mu, logvar, horizon=steps, temperature=1.15)
    lengths = dream.rollout(
        torch.zeros(1, controller().num_params), 3000, torch.Generator().manual_seed(2)
    ).lengths
    expected = (1 - (1 - hazard) ** steps) / hazard
    assert float(lengths.float().mean()) == pytest.approx(expected, abs=1.5)


def test_the_reward_and_the_end_are_those_of_the_frame_the_dream_draws():
    """With ``heads_read_z`` the heads read the sampled z_{t+1}: a reward head that reads z_{t+1}[0] alone
    pays exactly the drawn frame's z[0], and a done head that reads z_{t+1}[1] alone ends the dream exactly
    where the drawn z[1] crosses its threshold (tau = 1: z is sampled)."""
    memory = tiny_memory(rank=2, done_bias=-50.0)
    with torch.no_grad():
        memory.reward_head.weight.zero_()
        memory.reward_head.bias.zero_()
        memory.reward_head.weight[0, H] = 1.0
        memory.done_head.weight[0, H + 1] = 1e4
        memory.done_head.bias.fill_(-1e4 * 4.0)  # ends where z_{t+1}[1] > 4.0
    mu, logvar = starts()
    env = DreamEnv(memory, mu, logvar, action_space=CAR_ACTIONS, horizon=40, temperature=1.0)
    ended = 0
    for seed in range(8):
        env.reset(seed=seed)
        terminated = truncated = False
        while not (terminated or truncated):
            obs, reward, terminated, truncated, _ = env.step(CAR_ACTIONS.sample())
            assert reward == pytest.approx(float(obs[0]), abs=1e-5)
            assert terminated == bool(obs[1] > 4.0)
        ended += terminated
    assert 0 < ended < 8
    dream = BatchedDream(memory, controller(), mu, logvar, horizon=40, temperature=1.0)
    trace = dream.rollout(
        torch.randn(2, controller().num_params), 8, torch.Generator().manual_seed(3), record=True
    )
    alive = torch.arange(trace.rewards.shape[-1]) < trace.lengths[..., None]
    drawn = trace.observations[..., 1:, :]
    torch.testing.assert_close(trace.rewards[alive], drawn[..., 0][alive])
    assert torch.equal(trace.dones[alive], drawn[..., 1][alive] > 4.0)


def test_pessimism_pays_the_memories_disagreement_and_draws_the_same_dreams():
    """With critics, each step's reward is the dream's less lambda times the std over M and the critics of
    log p(z_{t+1} | history) per dimension, computed here from each memory's whole-sequence log-likelihood of
    the dreamt frames (another code path); the dreams themselves (frames, ends) are those without critics."""
    from frmdn_worldmodels.dream.pessimism import Pessimism

    memory, critics, weight = (
        tiny_memory(seed=0),
        [tiny_memory(seed=1), tiny_memory(kind="rmdn", seed=2)],
        2.0,
    )
    mu, logvar = starts()
    plain = DreamDynamics(memory, mu, logvar, horizon=3, temperature=1.0)
    pessimist = DreamDynamics(
        memory, mu, logvar, horizon=3, temperature=1.0, pessimism=Pessimism(critics, weight)
    )
    actions = torch.randn(3, 5, A, generator=torch.Generator().manual_seed(4))
    outcomes, frames = [], []
    for dynamics in (plain, pessimist):
        generator = torch.Generator().manual_seed(7)
        batch = dynamics.start(5, generator)
        zs, rewards = [batch.z.clone()], []
        with torch.inference_mode():
            for step in range(3):
                batch.action[:] = actions[step]
                reward, _ = dynamics.step(batch, generator)
                zs.append(batch.z.clone())
                rewards.append(reward.clone())
        frames.append(torch.stack(zs, dim=1))
        outcomes.append((torch.stack(rewards, dim=1), batch.alive.clone(), batch.penalties.clone()))
    torch.testing.assert_close(frames[0], frames[1], rtol=0, atol=0)
    (plain_rewards, alive, _), (pessimist_rewards, alive_too, penalties) = outcomes
    assert torch.equal(alive, alive_too)
    with torch.no_grad():
        log_probs = torch.stack(
            [m.sequence_log_prob(frames[0], actions.transpose(0, 1))[0] for m in (memory, *critics)]
        )
    expected = weight * log_probs.std(dim=0, unbiased=False) / Z  # [B, T]
    lived = plain_rewards != 0
    torch.testing.assert_close(
        (plain_rewards - pessimist_rewards)[lived], expected[lived], rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(penalties, (expected * lived).sum(dim=1), rtol=1e-4, atol=1e-5)
    assert bool((expected > 0).all())


def test_critics_like_the_memory_cost_nothing_and_candidates_share_their_dreams():
    """Critics equal to M agree everywhere (no pessimism); other critics take their disagreement off every
    candidate's dreams (each row of the population with its own copy of the critics' states), which are
    the dreams without critics."""
    from frmdn_worldmodels.dream.pessimism import Pessimism

    memory = tiny_memory(seed=0)
    controller = Controller(Z, H, A, discrete=False)
    mu, logvar = starts()
    plain = BatchedDream(memory, controller, mu, logvar, horizon=4, temperature=1.0)
    same, other = (
        BatchedDream(
            memory, controller, mu, logvar, 4, 1.0, pessimism=Pessimism([tiny_memory(seed=seed)], 5.0)
        )
        for seed in (0, 3)
    )
    params = controller.initial_params(torch.Generator().manual_seed(0)).repeat(2, 1)
    results = [d.rollout(params, 3, torch.Generator().manual_seed(1)) for d in (plain, same, other)]
    torch.testing.assert_close(results[1].returns, results[0].returns, rtol=1e-5, atol=1e-5)
    assert float(results[1].penalties.abs().max()) < 1e-4
    assert bool((results[2].returns < results[0].returns).all())
    torch.testing.assert_close(results[2].returns + results[2].penalties, results[0].returns)


def test_a_critics_warm_start_state_is_its_own():
    from frmdn_worldmodels.dream.pessimism import Pessimism

    critic = tiny_memory(seed=1)
    rng = np.random.default_rng(0)
    state = (rng.normal(size=(4, H)).astype(np.float32), rng.normal(size=(4, H)).astype(np.float32))
    ((h, c),) = Pessimism([critic], 1.0, [state], count=4).start(torch.tensor([2, 0]))
    np.testing.assert_array_equal(h[0].numpy(), state[0][[2, 0]])
    np.testing.assert_array_equal(c[0].numpy(), state[1][[2, 0]])
    with pytest.raises(ValueError, match="initial_state must be"):
        Pessimism([critic], 1.0, [state], count=5)

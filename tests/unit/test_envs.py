"""The real games behind ``make_env`` and the exploration policies (no Ray here)."""

from __future__ import annotations

import dataclasses

import cv2
import gymnasium
import numpy as np
import pytest

from frmdn_worldmodels.games import mario_expert
from frmdn_worldmodels.games.carracing import (
    FOLLOW_ROWS,
    INDICATOR_ROWS,
    BrownianCarPolicy,
    TrackFollowerCarPolicy,
    road_offset,
)
from frmdn_worldmodels.games.envs import (
    action_dim,
    decode_action,
    encode_action,
    is_discrete,
    make_env,
    sprite_centres,
)
from frmdn_worldmodels.games.mario import mario_buttons, right_biased_probs
from frmdn_worldmodels.games.policies import HeldDiscretePolicy, make_exploration_policy
from frmdn_worldmodels.runtime.config import CollectConfig, ConfigError, EnvConfig
from frmdn_worldmodels.stages.collect import rollout_episode

CAR = EnvConfig(name="carracing", max_steps=12)
MARIO = EnvConfig(name="mario", max_steps=12)
MARIO_LONG = EnvConfig(name="mario", max_steps=200)


def play(env: gymnasium.Env, actions, seed: int):
    """Frames, rewards and end flags of ``actions`` from ``reset(seed=seed)``."""
    obs, _ = env.reset(seed=seed)
    frames, rewards, flags = [obs], [], []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        frames.append(obs)
        rewards.append(reward)
        flags.append((terminated, truncated))
        if terminated or truncated:
            break
    return np.stack(frames), np.array(rewards), flags


@pytest.mark.parametrize("env_cfg", [CAR, MARIO], ids=["carracing", "mario"])
def test_frames_spaces_and_time_limit(env_cfg):
    env = make_env(env_cfg, seed=3)
    assert env.observation_space == gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    if is_discrete(env_cfg):
        assert env.action_space == gymnasium.spaces.Discrete(len(mario_buttons(env_cfg)))
        actions = [1] * 50  # run right: Mario neither dies nor finishes in 12 steps
    else:
        assert env.action_space.shape == (3,)
        np.testing.assert_array_equal(env.action_space.low, [-1, 0, 0])
        np.testing.assert_array_equal(env.action_space.high, [1, 1, 1])
        actions = [np.array([0.0, 0.5, 0.0], np.float32)] * 50
    frames, _, flags = play(env, actions, seed=3)
    assert frames.dtype == np.uint8 and frames.shape == (env_cfg.max_steps + 1, 64, 64, 3)
    assert flags[-1] == (False, True) and all(flag == (False, False) for flag in flags[:-1])
    assert frames.std() > 1.0  # a real picture, not a blank frame
    env.close()


@pytest.mark.parametrize(
    "env_cfg",
    [CAR, dataclasses.replace(CAR, crop_indicators=False), MARIO],
    ids=["carracing-cropped", "carracing-full", "mario"],
)
def test_frame_is_the_native_frame_cropped_and_area_resized(env_cfg):
    """Independent reference: the registered game's own frame, cropped and resized here by hand."""
    if env_cfg.name == "carracing":
        raw = gymnasium.make("CarRacing-v3")
        native, _ = raw.reset(seed=5)
        if env_cfg.crop_indicators:
            native = native[: 96 - INDICATOR_ROWS]
    else:
        import gym_super_mario_bros  # noqa: F401

        raw = gymnasium.make("SuperMarioBros-1-1-v0")
        native, _ = raw.reset(seed=5)
    expected = cv2.resize(native, (64, 64), interpolation=cv2.INTER_AREA)
    obs, _ = make_env(env_cfg).reset(seed=5)
    np.testing.assert_array_equal(obs, expected)
    raw.close()


def test_carracing_reset_seed_is_reproducible_and_seeds_differ():
    env = make_env(CAR)
    actions = [np.array([0.3, 1.0, 0.0], np.float32)] * 12
    first = play(env, actions, seed=11)
    again = play(env, actions, seed=11)  # same env object, reused: nothing leaks across resets
    other = play(make_env(CAR), actions, seed=12)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0][0], other[0][0])  # another seed, another track


def test_make_env_seed_makes_unseeded_resets_reproducible():
    first = [make_env(CAR, seed=21).reset()[0] for _ in range(2)]
    other, _ = make_env(CAR, seed=22).reset()
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first[0], other)


@pytest.mark.parametrize("env_cfg", [CAR, MARIO], ids=["carracing", "mario"])
def test_action_repeat_sums_rewards_of_the_repeated_frames(env_cfg):
    action = 3 if is_discrete(env_cfg) else np.array([0.2, 1.0, 0.0], np.float32)
    base = dataclasses.replace(env_cfg, max_steps=40)
    once = play(make_env(base), [action] * 8, seed=2)
    twice = play(make_env(dataclasses.replace(base, action_repeat=2)), [action] * 4, seed=2)
    np.testing.assert_allclose(twice[1], once[1].reshape(4, 2).sum(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(twice[0], once[0][::2])


def test_action_encoding():
    assert action_dim(CAR) == 3 and not is_discrete(CAR)
    assert action_dim(MARIO) == 7 and is_discrete(MARIO)  # SIMPLE_MOVEMENT
    assert action_dim(dataclasses.replace(MARIO, mario_actions="right_only")) == 5
    assert action_dim(dataclasses.replace(MARIO, mario_actions="complex")) == 12
    car = np.array([-0.5, 0.25, 1.0])
    encoded = encode_action(CAR, car)
    assert encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded, car.astype(np.float32))
    np.testing.assert_array_equal(decode_action(CAR, [2.0, -1.0, 0.5]), [1.0, 0.0, 0.5])
    for index in range(7):
        one_hot = encode_action(MARIO, index)
        assert one_hot.dtype == np.float32 and one_hot.sum() == 1.0 and one_hot[index] == 1.0
        assert decode_action(MARIO, one_hot) == index


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "pong"}, "env.name"),
        ({"name": "mario", "mario_level": "9-1"}, "env.mario_level"),
        ({"name": "mario", "mario_actions": "all"}, "env.mario_actions"),
        ({"frame_size": 0}, "env.frame_size"),
        ({"max_steps": 0}, "env.max_steps"),
        ({"action_repeat": 0}, "env.action_repeat"),
    ],
)
def test_bad_env_config_is_refused_with_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_env(dataclasses.replace(CAR, **changes))


def test_brownian_policy_is_smooth_bounded_and_seeded():
    rho = 0.9
    policy = BrownianCarPolicy(np.random.default_rng(0), rho)
    policy.reset()
    latents, actions = [], []
    for _ in range(20000):
        latents.append(policy.latent.copy())
        actions.append(policy.act(None))
    latents, actions = np.array(latents), np.array(actions)
    # stationary AR(1): unit variance and lag-1 correlation rho in every coordinate
    np.testing.assert_allclose(latents.std(axis=0), 1.0, atol=0.1)
    lag1 = [np.corrcoef(latents[:-1, i], latents[1:, i])[0, 1] for i in range(3)]
    np.testing.assert_allclose(lag1, rho, atol=0.02)
    assert actions.dtype == np.float32
    assert np.all(actions >= [-1, 0, 0]) and np.all(actions <= [1, 1, 1])
    assert np.mean(actions[:, 2] == 0.0) == pytest.approx(0.5, abs=0.05)  # brakes half the time
    replay = make_exploration_policy(CAR, CollectConfig(policy="brownian"), np.random.default_rng(0))
    replay.reset()
    np.testing.assert_array_equal([replay.act(None) for _ in range(50)], actions[:50])


def test_uniform_car_policy_is_white_noise_in_the_box():
    policy = make_exploration_policy(CAR, CollectConfig(policy="random"), np.random.default_rng(1))
    policy.reset()
    actions = np.array([policy.act(None) for _ in range(5000)])
    assert np.all(actions >= [-1, 0, 0]) and np.all(actions <= [1, 1, 1])
    np.testing.assert_allclose(actions.mean(axis=0), [0.0, 0.5, 0.5], atol=0.03)
    assert abs(np.corrcoef(actions[:-1, 0], actions[1:, 0])[0, 1]) < 0.05


GRASS, ROAD = (100, 204, 100), (105, 105, 105)


def grass_with_road(columns: slice, rows: slice = slice(None)) -> np.ndarray:
    frame = np.empty((64, 64, 3), np.uint8)
    frame[:] = GRASS
    frame[rows, columns] = ROAD
    return frame


@pytest.mark.parametrize("cropped", [True, False])
def test_road_offset_is_the_road_columns_mean_in_the_band_ahead(cropped):
    # columns 8..15 hold road: mean column 11.5, pixel centre 12, offset (12 - 32) / 32
    assert road_offset(grass_with_road(slice(8, 16)), cropped) == pytest.approx(-20 / 32)
    assert road_offset(grass_with_road(slice(40, 64)), cropped) == pytest.approx((52 - 32) / 32)
    assert road_offset(grass_with_road(slice(0, 0)), cropped) is None
    # road outside the band (behind the car, or beyond it) is not looked at
    playfield = 64 if cropped else 56
    below = slice(round(FOLLOW_ROWS[1] * playfield), None)
    assert road_offset(grass_with_road(slice(40, 64), below), cropped) is None
    # kerbs (red, white) are not road
    frame = grass_with_road(slice(0, 0))
    frame[:, 30:34] = (255, 0, 0)
    frame[:, 34:38] = (255, 255, 255)
    assert road_offset(frame, cropped) is None


def reference_episode(rng: np.random.Generator, max_blend: float, max_gas: float = 0.15):
    """What a track follower's ``reset`` draws from ``rng``, in its order, drawn again independently: a
    brownian car reset first, then the episode's blend weight, then its gas (only when it can vary)."""
    brownian = BrownianCarPolicy(rng, 0.9)
    brownian.reset()
    weight = rng.uniform(0.0, max_blend)
    gas = rng.uniform(0.15, max_gas) if max_gas > 0.15 else 0.15
    return brownian, weight, gas


def test_track_follower_steers_towards_the_road_blended_with_the_brownian_car():
    alone = TrackFollowerCarPolicy(np.random.default_rng(0), 0.9, max_blend=0.0, cropped=True)
    alone.reset()
    left, right = alone.act(grass_with_road(slice(24, 32))), alone.act(grass_with_road(slice(34, 38)))
    np.testing.assert_allclose(left, [3 * (28 - 32) / 32, 0.15 * (1 - 3 * 4 / 32), 0.0], rtol=1e-6)
    np.testing.assert_allclose(right, [3 * 4 / 32, 0.15 * (1 - 3 * 4 / 32), 0.0], rtol=1e-6)
    assert alone.act(grass_with_road(slice(0, 4)))[0] == -1.0  # saturates
    assert alone.act(grass_with_road(slice(0, 0)))[0] == 0.0  # no road in sight: straight on

    collect = CollectConfig(policy="track_follower", follower_blend=0.6)
    frame = grass_with_road(slice(24, 32))
    follow = alone.act(frame)
    blended = make_exploration_policy(CAR, collect, np.random.default_rng(1))
    reference_rng = np.random.default_rng(1)
    blends = []
    for _ in range(300):
        blended.reset()
        brownian, weight, _ = reference_episode(reference_rng, 0.6)
        blends.append(blended.blend)
        for _ in range(5):
            expected = (1 - weight) * follow + weight * brownian.act(frame)
            action = blended.act(frame)
            assert action.dtype == np.float32
            assert np.all(action >= [-1, 0, 0]) and np.all(action <= [1, 1, 1])
            np.testing.assert_allclose(action, expected, rtol=1e-6, atol=1e-7)
    assert min(blends) >= 0.0 and max(blends) <= 0.6 and np.mean(blends) == pytest.approx(0.3, abs=0.03)


def test_track_follower_draws_its_gas_per_episode_up_to_follower_gas_max():
    frame = grass_with_road(slice(34, 38))  # steer 3 * 4 / 32: the gas is g (1 - 0.375)
    collect = CollectConfig(policy="track_follower", follower_blend=0.0, follower_gas_max=0.5)
    policy = make_exploration_policy(CAR, collect, np.random.default_rng(3))
    reference_rng = np.random.default_rng(3)
    gases = []
    for _ in range(400):
        policy.reset()
        brownian, _, gas = reference_episode(reference_rng, 0.0, 0.5)
        first, second = policy.act(frame), policy.act(frame)
        brownian.act(frame), brownian.act(frame)  # weighted 0, drawn all the same
        np.testing.assert_allclose(first, [3 * 4 / 32, gas * (1 - 3 * 4 / 32), 0.0], rtol=1e-6)
        np.testing.assert_array_equal(first, second)  # one gas for the whole episode
        gases.append(first[1] / (1 - 3 * 4 / 32))
    assert min(gases) >= 0.15 - 1e-6 and max(gases) <= 0.5 + 1e-6
    assert np.mean(gases) == pytest.approx(0.325, abs=0.01) and np.std(gases) > 0.08
    # at its default the follower draws nothing more: the generator's stream is what it always was
    fixed = make_exploration_policy(CAR, CollectConfig(policy="track_follower"), np.random.default_rng(4))
    reference_rng = np.random.default_rng(4)
    for _ in range(3):
        fixed.reset()
        reference_episode(reference_rng, 1.0)
    assert fixed.gas == 0.15 and fixed.rng.random() == reference_rng.random()


def test_track_follower_earns_tiles_on_a_real_track():
    env_cfg = EnvConfig(name="carracing", action_repeat=2, max_steps=150)
    env = make_env(env_cfg)
    returns = {}
    for name in ("track_follower", "brownian"):
        policy = make_exploration_policy(
            env_cfg, CollectConfig(policy=name, follower_blend=0.0), np.random.default_rng(0)
        )
        returns[name] = rollout_episode(env, env_cfg, policy, seed=5)["rewards"].sum()
    # 150 steps of 2 frames with 300 tiles worth 1000 / 300 each: the follower keeps to the road and earns
    # tiles, the brownian car does not
    assert returns["track_follower"] > 100 > returns["brownian"]


def test_mario_policy_holds_actions_and_prefers_right():
    collect = CollectConfig(policy="auto", mario_repeat=4, right_bias=0.8)
    policy = make_exploration_policy(MARIO, collect, np.random.default_rng(2))
    assert isinstance(policy, HeldDiscretePolicy)
    policy.reset()
    actions = np.array([policy.act(None) for _ in range(40000)])
    holds_right = np.array(["right" in combo for combo in mario_buttons(MARIO)])
    probs = right_biased_probs(mario_buttons(MARIO), 0.8)
    np.testing.assert_allclose(probs.sum(), 1.0)
    np.testing.assert_allclose(probs[holds_right], 0.2)
    assert holds_right[actions].mean() == pytest.approx(0.8, abs=0.02)
    assert set(np.unique(actions)) == set(range(7))
    # Each draw is held Geometric(1/4) steps (mean 4); a draw equal to the previous action merges two holds,
    # so runs of equal actions last 4 / (1 - sum_i p_i^2) steps on average.
    changes = np.flatnonzero(np.diff(actions)) + 1
    runs = np.diff(np.concatenate([[0], changes, [len(actions)]]))
    assert runs.mean() == pytest.approx(4.0 / (1.0 - np.sum(probs**2)), rel=0.04)


def test_policy_must_fit_the_game():
    with pytest.raises(ConfigError, match=r"collect\.policy"):
        make_exploration_policy(MARIO, CollectConfig(policy="brownian"), np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"collect\.action_persistence"):
        make_exploration_policy(CAR, CollectConfig(action_persistence=1.0), np.random.default_rng(0))
    for blend in (-0.1, 1.1):
        with pytest.raises(ConfigError, match=r"collect\.follower_blend"):
            make_exploration_policy(CAR, CollectConfig(follower_blend=blend), np.random.default_rng(0))
    for gas in (0.1, 1.5):
        with pytest.raises(ConfigError, match=r"collect\.follower_gas_max"):
            make_exploration_policy(CAR, CollectConfig(follower_gas_max=gas), np.random.default_rng(0))
    for noise in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"collect\.expert_noise"):
            make_exploration_policy(
                MARIO, CollectConfig(policy="ram_expert", expert_noise=noise), np.random.default_rng(0)
            )
    with pytest.raises(ConfigError, match=r"collect\.policy"):
        make_exploration_policy(CAR, CollectConfig(policy="ram_expert"), np.random.default_rng(0))


def expert_ram(x: int = 100, y: int = 176) -> np.ndarray:
    """A fake console memory: Mario standing at level x ``x``, screen y ``y`` on flat ground two tiles thick
    (metatile rows 11 and 12 of both pages), no enemy."""
    ram = np.zeros(2048, dtype=np.uint8)
    ram[0x6D], ram[0x86], ram[0xCE], ram[0x1D] = x // 256, x % 256, y, 0
    for page in (0, 1):
        for row in (11, 12):
            start = mario_expert.TILE_MAP + page * 13 * 16 + row * 16
            ram[start : start + 16] = 0x54
    return ram


def set_tile(ram: np.ndarray, x: int, y: int, value: int) -> None:
    ram[mario_expert.tile_address(x, y)] = value


def test_mario_expert_reads_walls_gaps_and_enemies_ahead():
    ram = expert_ram()
    assert mario_expert.mario_position(ram) == (100, 176)
    assert not mario_expert.danger_ahead(ram, look=40)
    wall = ram.copy()
    set_tile(wall, 100 + 8 + 24, 176, 0x10)  # a pipe 24 px ahead, at Mario's height
    assert mario_expert.solid(wall, 132, 180) and mario_expert.danger_ahead(wall, look=40)
    assert not mario_expert.danger_ahead(wall, look=16), "a wall beyond the look-ahead is not a danger"
    gap = ram.copy()
    for row_y in (208, 224):
        set_tile(gap, 100 + 8 + 16, row_y, 0)
    assert mario_expert.danger_ahead(gap, look=40)
    gap[0x1D] = 1  # in the air, a gap below is where the jump already goes
    assert not mario_expert.danger_ahead(gap, look=40)
    for enemy_x, enemy_y, danger in ((130, 176, True), (130, 100, False), (80, 176, False)):
        enemy = ram.copy()
        enemy[0x0F], enemy[0x6E], enemy[0x87], enemy[0xCF] = 1, enemy_x // 256, enemy_x % 256, enemy_y
        assert mario_expert.danger_ahead(enemy, look=40) is danger, (enemy_x, enemy_y)
        enemy[0x0F] = 0  # an inactive slot is no enemy
        assert not mario_expert.danger_ahead(enemy, look=40)
    # the tile map holds two pages: ahead of x 250 is page 1
    wrap = expert_ram(x=250)
    set_tile(wrap, 280, 176, 0x10)
    assert wrap[mario_expert.TILE_MAP + 13 * 16 + 9 * 16 + 1] == 0x10
    assert mario_expert.danger_ahead(wrap, look=40)


def test_mario_expert_releases_a_between_jumps_and_holds_it_in_the_air():
    ram = expert_ram()
    set_tile(ram, 132, 176, 0x10)
    expert = mario_expert.MarioExpert(lambda: ram, look=40, hold=3)
    # on the ground before a wall: press, let go (the game needs A released to jump again), press
    assert [expert.act() for _ in range(3)] == [True, False, True]
    ram[0x1D] = 1  # airborne: A stays down for at most ``hold`` steps
    assert [expert.act() for _ in range(5)] == [True, True, True, False, False]
    expert.reset()
    ram[0x1D] = 0
    set_tile(ram, 132, 176, 0)
    assert not expert.act(), "nothing ahead: run without jumping"


def furthest_x(env: gymnasium.Env, act, steps: int) -> int:
    env.reset(seed=0)
    furthest = 0
    for _ in range(steps):
        _, _, terminated, truncated, info = env.step(act())
        furthest = max(furthest, info["x_pos"])
        if terminated or truncated:
            break
    return furthest


def test_mario_ram_expert_gets_far_past_the_running_player():
    env_cfg = dataclasses.replace(MARIO, max_steps=400, action_repeat=4)
    env = make_env(env_cfg)
    buttons = mario_buttons(env_cfg)
    policy = make_exploration_policy(
        env_cfg, CollectConfig(policy="ram_expert", expert_noise=0.0), np.random.default_rng(0), env
    )
    policy.reset()
    actions = []
    expert = furthest_x(env, lambda: actions.append(policy.act(None)) or actions[-1], 400)
    running = furthest_x(env, lambda: buttons.index(["right", "B"]), 400)
    # the first goomba (x ~ 320) stops a player that only runs; the expert clears the pipes and the first gap
    assert running < 400 and expert > 1200, (running, expert)
    assert set(actions) == {buttons.index(["right", "B"]), buttons.index(["right", "A", "B"])}
    with pytest.raises(ValueError, match="ram_expert reads the game's memory"):
        make_exploration_policy(env_cfg, CollectConfig(policy="ram_expert"), np.random.default_rng(0))


def test_mario_ram_expert_noise_is_drawn_per_episode():
    env_cfg = dataclasses.replace(MARIO, max_steps=400)
    env = make_env(env_cfg)
    policy = make_exploration_policy(
        env_cfg, CollectConfig(policy="ram_expert", expert_noise=0.5), np.random.default_rng(1), env
    )
    shares = []
    for _ in range(200):
        policy.reset()
        shares.append(policy.noise)
    assert 0.0 <= min(shares) and max(shares) <= 0.5
    assert np.mean(shares) == pytest.approx(0.25, abs=0.03)
    env.reset(seed=0)
    policy.noise = 1.0  # every step random: uniform over the action set
    actions = np.array([policy.act(None) for _ in range(7000)])
    assert np.bincount(actions, minlength=7) == pytest.approx(np.full(7, 1000), abs=150)


def test_the_first_goomba_is_drawn_where_the_ram_says():
    """The RAM expert (no noise) runs into 1-1 until the first goomba is on the screen: the sprite's pixels
    fill the 5 x 5 square (native pixels) around the centre ``enemy_centres`` gives, and 8-14 px above it
    is sky (the colour above the level: one tile off in y fails both); ``sprite_centres`` scales it to the
    frame. The screen is scrolling here, so the goomba is drawn about 4 px right of the centre."""
    env = make_env(MARIO_LONG)
    try:
        policy = make_exploration_policy(
            MARIO_LONG, CollectConfig(policy="ram_expert", expert_noise=0.0), np.random.default_rng(0), env
        )
        env.reset(seed=0)
        policy.reset()
        for _ in range(MARIO_LONG.max_steps):
            env.step(policy.act(None))
            centres = mario_expert.enemy_centres(env.unwrapped.ram)
            if (~np.isnan(centres[:, 0]) & (centres[:, 0] < 200)).any():
                break
        slot = int(np.flatnonzero(~np.isnan(centres[:, 0]))[0])
        x, y = centres[slot].astype(int)
        screen = env.unwrapped.screen
        sky = screen[40, 8]  # above the level, left of the score
        assert not (screen[y - 2 : y + 3, x - 2 : x + 3] == sky).all(axis=-1).any()
        assert (screen[y - 14 : y - 7, x - 2 : x + 3] == sky).all(axis=-1).all()
        size = env.observation_space.shape[0]
        np.testing.assert_allclose(
            sprite_centres(env)[1 + slot], centres[slot] * [size / 256, size / 240], rtol=1e-6
        )
    finally:
        env.close()


def test_mario_stands_where_the_ram_says_at_the_start_of_1_1():
    """Small Mario starts standing on the ground at screen x 40-56, feet at y 208 (checked on the frame: the
    patch of ``vae.player_weight`` and ``experiments/player_patch.py`` is centred on his sprite)."""
    env = make_env(MARIO)
    try:
        env.reset(seed=0)
        assert mario_expert.screen_centre(env.unwrapped.ram) == (48.0, 200.0)
        # the same point in the 64 x 64 frame: x * 64 / 256, y * 64 / 240
        np.testing.assert_allclose(sprite_centres(env)[0], [12.0, 200 * 64 / 240], rtol=1e-6)
        ram = env.unwrapped.ram.copy()
        ram[0xB5] = 2  # falling down a hole: below the screen
        assert mario_expert.screen_centre(ram) is None
    finally:
        env.close()
    car = make_env(CAR)
    try:
        car.reset(seed=0)
        assert sprite_centres(car) is None
    finally:
        car.close()

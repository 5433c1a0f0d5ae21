"""Per-step cost of the V + M + C agent next to the bare CarRacing steps it drives.

    .venv/bin/python perf/agent_overhead.py [--steps 300] [--envs 1 8] [--threads 1]

CarRacing-v3 (through ``games.envs.make_env``: 64x64 frames) played by the paper-scale agent (ConvVAE with
z of 32; FRMDN memory with LSTM 256, K = 5, d' = 3, a coupling flow; linear controller), with random weights
(the cost does not depend on them), for N envs in lockstep as a rollout actor plays them
(``agent.play.play_episodes``: one batched agent call per step for all N envs, then each env steps).
Every step times the agent call and the N env steps separately; overhead = total agent time / total env
time. One torch thread by default, as in a Ray rollout actor. Goal: <= 10%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frmdn_worldmodels.agent.play import WorldModelAgent, controller_for, onednn
from frmdn_worldmodels.games.envs import make_env
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.models.vae import ConvVAE
from frmdn_worldmodels.runtime.config import EnvConfig, MemoryConfig


def measure(envs, agent: WorldModelAgent, steps: int) -> tuple[float, float]:
    """(agent seconds, env seconds) per env step over ``steps`` lockstep steps of ``len(envs)`` envs."""
    seeds = list(range(len(envs)))
    observations = [env.reset(seed=seed)[0] for env, seed in zip(envs, seeds, strict=True)]
    agent.reset(seeds)
    for _ in range(3):  # warm-up: first calls allocate
        agent.act(np.stack(observations))
    agent.reset(seeds)
    agent_time = env_time = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        actions = agent.act(np.stack(observations))
        middle = time.perf_counter()
        for i, env in enumerate(envs):
            observations[i], _, terminated, truncated, _ = env.step(actions[i])
            if terminated or truncated:
                observations[i], _ = env.reset()
        agent_time += middle - start
        env_time += time.perf_counter() - middle
    count = steps * len(envs)
    return agent_time / count, env_time / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="lockstep steps timed per setting")
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 8], help="envs in lockstep (one row each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a rollout actor uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env_cfg = EnvConfig(name="carracing", max_steps=args.steps + 10)
    vae = ConvVAE(32).eval()
    memory = MemoryModel(32, 3, MemoryConfig(kind="frmdn", hidden=256, components=5, rank=3)).eval()
    controller = controller_for(env_cfg, memory, hidden=0)
    agent = WorldModelAgent(vae, memory, controller, 0.1 * torch.randn(controller.num_params), use_mu=False)
    envs = [make_env(env_cfg) for _ in range(max(args.envs))]
    print(
        f"CarRacing-v3 64x64, {torch.get_num_threads()} torch thread(s); paper-scale agent "
        f"(z 32, LSTM 256, K=5, d'=3, flow); {args.steps} lockstep steps per row"
    )
    print(f"  {'envs':>4}  {'env step':>12}  {'agent':>12}  overhead")
    for count in args.envs:
        agent_seconds, env_seconds = measure(envs[:count], agent, args.steps)
        overhead = agent_seconds / env_seconds
        verdict = "met" if overhead <= 0.10 else "NOT met"
        print(
            f"  {count:4d}  {1e3 * env_seconds:9.3f} ms  {1e3 * agent_seconds:9.3f} ms  "
            f"{100 * overhead:6.1f} %"
            f"   (per env step; goal <= 10%: {verdict})"
        )
    for env in envs:
        env.close()
    # what one agent call costs, by part, for one frame (medians)
    frame = np.zeros((1, 64, 64, 3), dtype=np.uint8)

    def memory_step(*args):
        with onednn(False):
            return memory.step(*args)

    agent.reset([0])
    with torch.inference_mode():
        z = agent.encode(frame)
        h = agent.state[0][0]
        action = controller.act(agent.params, z, h)
        parts = {
            "encode (VAE)": lambda: agent.encode(frame),
            "act (controller)": lambda: controller.act(agent.params, z, h),
            "memory step": lambda: memory_step(z, controller.encode(action), agent.state),
        }
        print("  one frame, by part (oneDNN as the agent uses it for 1 frame):")
        for name, call in parts.items():
            samples = []
            for _ in range(200):
                start = time.perf_counter()
                call()
                samples.append(time.perf_counter() - start)
            print(f"    {name:18s} {1e3 * statistics.median(samples):8.3f} ms")


if __name__ == "__main__":
    main()

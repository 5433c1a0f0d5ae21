"""A memory model that records every recurrent step, for the alignment tests of the agent and the dream."""

from frmdn_worldmodels.models.memory import MemoryModel


class TracedMemory(MemoryModel):
    """Records what each ``step`` read (y, cond, the h it started from), the h it ended with and what it
    returned; ``sample`` adds to the last record what it drew, from which outputs and at which temperature."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace = []

    def step(self, y, cond, state):
        out, new_state = super().step(y, cond, state)
        self.trace.append(
            {
                "y": y.clone(),
                "cond": cond.clone(),
                "h_before": state[0][0].clone(),
                "h_after": new_state[0][0].clone(),
                "out": out,
            }
        )
        return out, new_state

    def sample(self, out, temperature=1.0, generator=None):
        z = super().sample(out, temperature, generator)
        self.trace[-1].update(sampled=z.clone(), sampled_from=out, temperature=temperature)
        return z

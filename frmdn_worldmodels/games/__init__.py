"""The real games behind one interface: envs, frame preprocessing, exploration policies, the Mario RAM
expert."""

from frmdn_worldmodels.games import carracing, doom, mario  # noqa: E402, F401 (the built-in games register)

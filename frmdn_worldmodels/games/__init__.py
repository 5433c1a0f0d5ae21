"""The real games behind one interface: envs, frame preprocessing, exploration policies, the Mario RAM
expert."""

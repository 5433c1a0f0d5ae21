"""Models and math of the world model: the FRMDN memory, the VAE, their data and training (no envs, no
Ray)."""

"""The networks and their math: the ConvVAE (V), the FRMDN/RMDN memory (M) with its low-rank mixture and
coupling flow, the controller (C)."""

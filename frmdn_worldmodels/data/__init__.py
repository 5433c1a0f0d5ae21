"""What is kept on disk and read back: episodes and latents, VAE frame streams, the memory's training
sequences."""

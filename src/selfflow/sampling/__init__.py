"""The sampler side: the samplers' maths (a velocity function in, latents out), their
settings and defaults, and the pipeline (checkpoint + sampler + VAE -> images)."""

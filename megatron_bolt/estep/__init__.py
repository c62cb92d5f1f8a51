"""E-step: sample latents, score them with the joint model, importance-resample one per chunk."""

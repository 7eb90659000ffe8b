"""Training data for the real backbones: image-caption sources and the latent cache."""

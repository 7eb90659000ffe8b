"""The method's losses: TSCD, the adversarial term, human feedback, score distillation."""

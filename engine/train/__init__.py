"""The training loop and the run lifecycle around it."""

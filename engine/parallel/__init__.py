"""Parallel state, process groups and rank liveness."""

"""Evaluation: metrics and judges, the digits table, image evaluation, the bench, sample grids."""

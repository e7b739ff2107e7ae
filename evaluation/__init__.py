"""Datasets, ranx scoring, reports, plots and benchmarks."""

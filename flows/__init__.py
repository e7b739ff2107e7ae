"""Prefect flows and deployments: thin composition of the stages in ``tasks/``."""

"""Evaluation: scoring model responses with the SDFT reference rules."""

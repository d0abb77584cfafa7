"""Sampling backends. Each turns prompt ids into `Samples`."""

from pbkd_cli.generation.hf import Samples, generate

__all__ = ["Samples", "generate"]

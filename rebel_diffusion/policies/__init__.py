"""Policies: what acts. Each samples `Trajectory` batches and re-scores their steps under its current weights."""

from rebel_diffusion.policies.lcm import LCMPolicy

__all__ = ["LCMPolicy"]

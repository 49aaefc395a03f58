"""apo_ray: Action Preference Optimization for VLA policies refined from corrector interventions."""

__version__ = "0.1.0"

"""DSPO pipeline: preference alignment of diffusion super-resolution models.

Every stage lives in its own module and is reachable as ``python -m pipeline STAGE``.
"""

__version__ = "0.1.0"

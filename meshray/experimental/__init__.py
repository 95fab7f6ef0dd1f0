"""Experimental APIs with Ray's names: `meshray.experimental.tqdm_ray`.

Like Ray's `ray.experimental`, what lives here may change between releases.
"""
from __future__ import annotations

from meshray.experimental import tqdm_ray

__all__ = ["tqdm_ray"]

"""Class-prior images: a shared, content-keyed cache filled by generator actors on Ray Data."""

from raydb.prior.cache import PriorCache, prior_cache_for
from raydb.prior.pipeline import ensure_prior_images

__all__ = ["PriorCache", "prior_cache_for", "ensure_prior_images"]

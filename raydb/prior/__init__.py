"""Class-prior images: a shared, content-keyed cache filled by generator actors on Ray Data.

``cache.py`` (key, blocks, manifest), ``generate.py`` (the pipeline that makes a block) and
``stage.py`` (the Ray Data stage and ``class_images``, the package's only Ray code).
"""

from raydb.prior.cache import PriorCache, prior_cache_for
from raydb.prior.stage import class_images, ensure_prior_images

__all__ = ["PriorCache", "prior_cache_for", "ensure_prior_images", "class_images"]

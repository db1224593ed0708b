"""The encoded cache: images and prompts run once through the frozen VAE and text encoder.

``encoders.py`` holds the pure encoders (PIL images -> latent distributions, prompts -> embeddings),
``cache.py`` the cache's location, schema and readers/writers, and ``stage.py`` the Ray Data stage
that fills it (the package's only Ray code).
"""

from raydb.encode.cache import EncodedCache, encoded_cache_for, load_prompts, read_encoded
from raydb.encode.encoders import EncodedImages

__all__ = ["EncodedCache", "EncodedImages", "encoded_cache_for", "load_prompts", "read_encoded"]

"""Ray Serve entrypoints for raydb (thin: the logic lives in raydb.serving)."""

"""Base models: ``components.py`` resolves ``model.pretrained`` (tiny, a folder, s3://, a hub id) to
a diffusers folder with a content identity and loads its parts; ``tiny.py`` builds the embedded
tiny SD model in code."""

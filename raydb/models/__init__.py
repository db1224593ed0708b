"""Base models: ``components.py`` resolves ``model.pretrained`` (tiny, a folder, s3://, a hub id) to
a diffusers folder with a content identity and loads its parts; ``family.py`` tells SD 1.x/2.x from
SDXL and holds what differs between them, ``sdxl.py`` SDXL's conditioning; ``tiny.py`` and
``tiny_sdxl.py`` build the embedded tiny SD and SDXL models in code."""

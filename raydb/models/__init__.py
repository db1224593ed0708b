"""Base models: ``components.py`` resolves ``model.pretrained`` (digits, tiny, a folder, s3://, a hub
id) to a diffusers folder with a content identity and loads its parts; ``family.py`` tells SD
1.x/2.x from SDXL and holds what differs between them, ``sdxl.py`` SDXL's conditioning; ``tiny.py``
and ``tiny_sdxl.py`` build the embedded tiny SD and SDXL models (random weights) in code;
``digits.py`` is the built-in model trained on real digits (its weights ship in ``weights/digits/``)
and ``digits_recipe.py`` the seeded recipe that trained them."""

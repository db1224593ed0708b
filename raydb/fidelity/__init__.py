"""Judging what a model draws — for evaluation only, never for training.

``judge.py`` (a digit classifier fitted at use on real digits, and the colour-trait detector of a
subject), ``metrics.py`` (subject fidelity, language drift, class accuracy, diversity, other-class
accuracy from sampled images), ``experiment.py`` (DreamBooth arms, e.g. λ = 0 vs λ = 1, behind
``bench/fidelity.py``), ``validation.py`` (``eval.fidelity``: the figures as Tune's ``val_fidelity``)
and ``dino.py`` (``eval.dino_model``: the DreamBooth paper's DINO score for real models).
"""

"""The train stage: a LoRA adapter from the encoded cache, with the DreamBooth dual objective.

Pure PyTorch, testable without Ray: ``loss.py`` (the dual objective), ``lora.py`` (peft layers in and
out), ``data.py`` (deterministic ``[instance | class]`` micro-batches), ``step.py`` (one optimizer
step), ``device_options.py`` (precision, memory format, fused AdamW, CUDA graphs, compile),
``graphs.py`` (the step as captured CUDA graphs), ``prefetch.py`` (batches built ahead),
``engine.py`` (``TrainEngine``: the step both loops call), ``evaluate.py`` (fixed-noise validation),
``clip_eval.py``, ``checkpoint.py`` (state <-> safetensors + JSON), ``rundir.py`` (the run folder),
``progress.py`` (``progress.json``), ``outputs.py`` (adapter, metrics, pictures) and ``local.py``
(the single-process loop). ``stage.py`` is the package's only Ray code: the Ray Train worker loop
and its driver.
"""

"""The train stage: a LoRA adapter from the encoded cache, with the DreamBooth dual objective.

Pure PyTorch, testable without Ray: ``loss.py`` (the dual objective), ``lora.py`` (peft layers in and
out), ``data.py`` (deterministic ``[instance | class]`` micro-batches), ``step.py`` (one optimizer
step), ``speed.py`` (memory format, fused AdamW, compile), ``evaluate.py`` (fixed-noise validation),
``clip_eval.py``, ``checkpoint.py`` (state <-> safetensors + JSON), ``rundir.py`` (the run folder),
``outputs.py`` (adapter, metrics, pictures) and ``local.py`` (the single-process loop).
``stage.py`` is the package's only Ray code: the Ray Train worker loop and its driver.
"""

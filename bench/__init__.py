"""raydb's benchmarks: each a module run from the repository root with ``python -m bench.<name>``.

They measure the code users run — the training loop is ``raydb.train.engine.TrainEngine``, the
serving engine ``raydb.serving.engine.DiffusionEngine`` — and share one harness (``bench/harness.py``:
a budgeted run, step timing, the JSON result, markdown tables). Real-size architectures (SD 1.5,
SDXL base) come from ``raydb.models.architectures`` with random weights; ``--tiny`` runs the same
code on the tiny model on a CPU (``tests/bench/`` keeps every script running that way).

GPU (``bench/device_run.sh`` runs them on a lent device machine):
  gpu_truth          training at SD 1.5 size: engine arms (eager, prefetch, CUDA graphs, compile),
                     cached vs VAE-every-step, speed options, prior generation, diffusers' script as peer
  gpu_truth_sdxl     the same rows at SDXL base size (1024 px)
  serve_engine_gpu   the serving engine without Ray: CUDA graphs / compile, batched multi-subject load
CPU, tiny model:
  train_cache        cached latents vs the VAE every step, interleaved
  train_workers      Ray Train with 1 vs 2 workers
  prior_bench        Ray Data prior generation vs a plain loop
  serve_bench        HTTP serving, batching on vs off
  compile_parity     does ``train.compile`` give eager's LoRA gradients (a check, not a timing)
"""

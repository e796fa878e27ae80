"""MM-Diff training: `deepspeed --module train.main --config configs/train/<name>.yaml`.

Modules: config (the typed YAML), data (WebDataset shards -> batches, resumable), engine (the DeepSpeed
loop: ZeRO, accumulation, non-finite steps, checkpoints), tracking (MLflow), export (the adapter as a
registered pyfunc model), generate (an image from a registered model).
"""

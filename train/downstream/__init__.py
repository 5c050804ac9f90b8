"""Downstream evaluation: the benchmarks (datasets/), warping and augmentation, the face model and
its heads, metrics and drawings behind `python -m train.finetune`, `train.evaluate`, `train.transfer`
and `train.zeroshot`."""

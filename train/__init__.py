"""FaRL pre-training and downstream evaluation on the built LAION-FACE shards.

The programs are the modules here (`python -m train.NAME`): pretrain, export and retrieval for
pre-training; finetune, evaluate, transfer and zeroshot for the downstream benchmarks. What they
are built from lives in two packages, `train.pretraining` and `train.downstream`; `train.model`
(the FaRL model and its checkpoint formats) is what both halves use.
"""

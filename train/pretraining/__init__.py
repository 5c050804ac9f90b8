"""Pre-training: the data, the loop, the losses and MIM targets, masking, metrics and checkpoints
behind `python -m train.pretrain` and `python -m train.export`."""

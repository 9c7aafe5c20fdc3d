"""Tensor and pipeline parallelism over ``torch.distributed``: process groups
and the collectives the model and the runner use (``groups``)."""

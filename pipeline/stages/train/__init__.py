"""Stage `train`: the driver side (`stage`), the per-worker loop (`worker`), the DeepSpeed config and LR schedule
(`optim`), checkpoints (`checkpoints`), what training reports (`metrics`) and fine-tuning weights (`init_from`)."""

from pipeline.stages.train.stage import STAGE

__all__ = ["STAGE"]

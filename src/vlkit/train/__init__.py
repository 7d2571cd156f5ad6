"""The training loop, its configuration, optimizer, samplers, checkpoints and distributed helpers."""
from vlkit.train.checkpoint import find_latest, load_checkpoint, restore_rng, save_checkpoint
from vlkit.train.config import ParamGroupConfig, TrainConfig
from vlkit.train.distributed import init_distributed
from vlkit.train.ema import ModelEMA
from vlkit.train.loop import NonFiniteLossError, Trainer
from vlkit.train.sampler import RepeatedAugSampler, RepeatedCopies, ResumableSampler

__all__ = ["TrainConfig", "ParamGroupConfig", "Trainer", "NonFiniteLossError", "ModelEMA", "save_checkpoint",
           "load_checkpoint", "find_latest", "restore_rng", "ResumableSampler", "RepeatedAugSampler",
           "RepeatedCopies", "init_distributed"]

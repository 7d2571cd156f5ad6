"""The training loop, its configuration, optimizer, checkpoints and distributed helpers."""
from vlkit.train.checkpoint import find_latest, load_checkpoint, save_checkpoint
from vlkit.train.config import ParamGroupConfig, TrainConfig
from vlkit.train.distributed import init_distributed
from vlkit.train.ema import ModelEMA
from vlkit.train.loop import Trainer
from vlkit.train.sampler import RankBatchSampler, epoch_order

__all__ = ["TrainConfig", "ParamGroupConfig", "Trainer", "ModelEMA", "save_checkpoint", "load_checkpoint",
           "find_latest", "RankBatchSampler", "epoch_order", "init_distributed"]

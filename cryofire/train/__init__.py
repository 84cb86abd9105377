"""Training: data loading, the loop, checkpoints, predictions and run outputs."""

from cryofire.train.config import TrainConfig as TrainConfig
from cryofire.train.loop import Trainer as Trainer, train as train

"""Training: the run config, train state, optimizer, the sharded train step, checkpoints,
metrics/MFU and the loop."""
from lexjax.training.checkpoints import CheckpointError, Checkpointer
from lexjax.training.config import OptimizerConfig, TrainConfig
from lexjax.training.loop import TrainingError, train
from lexjax.training.optimizer import learning_rate_schedule, make_optimizer
from lexjax.training.state import TrainState, check_logical_axes
from lexjax.training.step import ShardedTrainStep, make_train_step

__all__ = ["train", "TrainConfig", "OptimizerConfig", "make_train_step", "ShardedTrainStep",
           "TrainState", "make_optimizer", "learning_rate_schedule", "Checkpointer",
           "CheckpointError", "TrainingError", "check_logical_axes"]

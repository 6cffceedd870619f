"""Training: train state, optimizer, loss, checkpoints, metrics/MFU and the loop."""
from lexjax.training.checkpoints import CheckpointError, Checkpointer
from lexjax.training.loop import TrainingError, make_eval_step, make_train_step, train
from lexjax.training.losses import shift_right, token_losses
from lexjax.training.optimizer import learning_rate_schedule, make_optimizer
from lexjax.training.state import TrainState, check_logical_axes

__all__ = ["train", "make_train_step", "make_eval_step", "TrainState", "make_optimizer",
           "learning_rate_schedule", "Checkpointer", "CheckpointError", "TrainingError",
           "shift_right", "token_losses", "check_logical_axes"]

"""The pieces of `python -m lexjax.bench`: measured rows on the devices at hand (`measure`),
compiler estimates for a Cloud TPU topology (`topology`), and the outputs (`report`). The bench
reads the run's model and `TrainConfig` exactly as the trainer does (`lexjax.runs`)."""

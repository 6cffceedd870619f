"""The pieces of `python -m lexjax.bench`: the run it measures (`spec`), measured rows on the
devices at hand (`measure`), compiler estimates for a Cloud TPU topology (`topology`), and the
outputs (`report`)."""
from lexjax.benchmarking.spec import BenchSpec, spec_from_gin, train_setting

__all__ = ["BenchSpec", "spec_from_gin", "train_setting"]

"""Pallas attention kernels (TPU Mosaic, GPU Mosaic, interpret) behind `attend(impl="pallas")`."""
from lexjax.attention.kernels.bias import HeadBias, offset_table
from lexjax.attention.kernels.flash import flash_attention
from lexjax.attention.kernels.geometry import BlockGrid

__all__ = ["HeadBias", "BlockGrid", "flash_attention", "offset_table"]

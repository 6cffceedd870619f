"""Pallas attention kernels (TPU Mosaic, GPU Mosaic, interpret) behind `attend(impl="pallas")`."""
from lexjax.attention.kernels.bias import HeadBias, offset_table
from lexjax.attention.kernels.geometry import BlockGrid
from lexjax.attention.kernels.pallas_attention import pallas_attention

__all__ = ["HeadBias", "BlockGrid", "pallas_attention", "offset_table"]

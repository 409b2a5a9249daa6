"""Number formats: codebooks, packing, calibration, quantise and dequantise."""

from ._quantize import Calibration, Layout, dequantize_array, parse_calibration, quantize_array
from ._spec import FORMATS, Format, get_format

__all__ = ["FORMATS", "Format", "get_format", "Calibration", "parse_calibration", "Layout",
           "quantize_array", "dequantize_array"]

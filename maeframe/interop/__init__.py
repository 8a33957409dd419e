"""Interoperability: reference MAE (facebookresearch/mae) weights in and out, timm encoder export."""
from .official_mae import (InteropError, infer_config, load_official_mae, maeframe_to_official,
                           official_to_maeframe)
from .timm_export import TimmExport, export_encoder

__all__ = ["InteropError", "infer_config", "load_official_mae", "maeframe_to_official", "official_to_maeframe",
           "export_encoder", "TimmExport"]

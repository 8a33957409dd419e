"""Interoperability: maeframe checkpoints, reference MAE (facebookresearch/mae) weights in and out, timm encoder
export. Other projects' weights come in through weight-format plugins (`maeframe.WeightFormat`)."""
from ..engine.checkpoint import checkpoint_entry, load_checkpoint
from .hf import (canonical_hf_name, check_hf_config, check_hf_shapes, hf_block_name, hf_grid, hf_to_official,
                 official_to_hf, read_hf_directory, reference_block_name)
from .official_mae import (InteropError, infer_config, load_official_mae, maeframe_to_official,
                           official_to_maeframe, read_official)
from .timm_export import TimmExport, export_encoder

__all__ = ["InteropError", "checkpoint_entry", "infer_config", "load_checkpoint", "load_official_mae", "maeframe_to_official",
           "official_to_maeframe", "read_official", "export_encoder", "TimmExport", "canonical_hf_name",
           "check_hf_config", "check_hf_shapes", "hf_block_name", "hf_grid", "hf_to_official", "official_to_hf", "read_hf_directory",
           "reference_block_name"]

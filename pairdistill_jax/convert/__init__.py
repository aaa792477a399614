"""PyTorch/HF <-> Flax weight conversion: one name table per architecture (BERT, T5), importers, exporters."""

from pairdistill_jax.convert.bert_table import flax_to_hf, hf_to_flax
from pairdistill_jax.convert.hf_io import (bert_prefix, export_bert, import_bert, import_colbert,
                                           import_cross_encoder, read_state_dict, write_safetensors)

__all__ = [
    "bert_prefix",
    "export_bert",
    "flax_to_hf",
    "hf_to_flax",
    "import_bert",
    "import_colbert",
    "import_cross_encoder",
    "read_state_dict",
    "write_safetensors",
]

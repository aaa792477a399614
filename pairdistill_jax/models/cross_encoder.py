"""BERT cross-encoder teacher: HF `BertForSequenceClassification` numerics in Flax linen.

The pointwise teacher (e.g. cross-encoder/ms-marco-MiniLM-L-6-v2, one label) and the duoBERT-style
pairwise teacher (two labels) are both this module; `convert.hf_io.import_cross_encoder` reads their
HF checkpoints into its parameter tree {'bert': BertEncoder params, 'classifier': {'kernel', 'bias'}}.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pairdistill_jax.models.bert import BertConfig, BertEncoder

_INIT_STD = 0.02  # HF initializer_range


class CrossEncoder(nn.Module):
  """BertEncoder -> pooled [CLS] -> dropout -> Dense(num_labels): float32 logits.

  Attributes:
    bert_config: the BERT hyperparameters; add_pooling_layer must be True (HF's classifier reads the
      pooler output).
    num_labels: classifier outputs (1 for a pointwise relevance logit).
    dtype: compute dtype of the BERT body; the classifier runs in float32.
    attention: the BertSelfAttention kernel (models.attention.ATTENTION_KERNELS; 'auto' picks one per platform).
  """

  bert_config: BertConfig
  num_labels: int
  dtype: Any = jnp.float32
  attention: str = "auto"

  def setup(self):
    if not self.bert_config.add_pooling_layer:
      raise ValueError("CrossEncoder needs the BERT pooler (BertForSequenceClassification classifies "
                       "the pooled [CLS]); build the BertConfig with add_pooling_layer=True.")
    self.bert = BertEncoder(self.bert_config, dtype=self.dtype, attention=self.attention)
    self.dropout = nn.Dropout(self.bert_config.hidden_dropout_prob)
    self.classifier = nn.Dense(
        self.num_labels, dtype=jnp.float32, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))

  def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array,
               token_type_ids_BxL: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Logits, float32, one row of num_labels per input row."""
    _, pooled_BxH = self.bert(input_ids_BxL, attention_mask_BxL, token_type_ids_BxL,
                              deterministic=deterministic)
    pooled_BxH = self.dropout(pooled_BxH.astype(jnp.float32), deterministic=deterministic)
    return self.classifier(pooled_BxH)

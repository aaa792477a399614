"""PairDistill losses (docs/design.md §2.4): pointwise KL, pairwise KL, in-batch CE, ColBERT and DPR totals.

Pure functions of fixed-shape arrays: float32 arithmetic, jit-able, masks instead of Python control flow.
Batch keys: `teacher` [B,N] raw pointwise-teacher logits, `passage_mask` [B,N] (False on padded passage
slots), `pair_i`, `pair_j` [B,P] passage indices, `pair_logp` [B,P] log P(i beats j), `pair_mask` [B,P]
(False on padded pairs).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from pairdistill_jax.data.batching import TARGET_KEYS

# Logit given to excluded slots: exp(_EXCLUDED - max) is exactly 0 in float32, and it stays finite.
_EXCLUDED = -1e30


def _masked_log_softmax(logits_BxK: jax.Array, mask_BxK: jax.Array) -> jax.Array:
  """log_softmax over the slots where mask is True (excluded slots get probability 0)."""
  return jax.nn.log_softmax(jnp.where(mask_BxK, logits_BxK, _EXCLUDED), axis=-1)


def _kl_batchmean(
    student_BxK: jax.Array, teacher_BxK: jax.Array, student_mask_BxK: jax.Array,
    teacher_mask_BxK: jax.Array) -> jax.Array:
  """KL(softmax(teacher) || softmax(student)) summed over slots, averaged over rows ('batchmean')."""
  log_q_BxK = _masked_log_softmax(student_BxK, student_mask_BxK)
  log_p_BxK = _masked_log_softmax(teacher_BxK, teacher_mask_BxK)
  kl_BxK = jnp.where(teacher_mask_BxK, jnp.exp(log_p_BxK) * (log_p_BxK - log_q_BxK), 0.0)
  return kl_BxK.sum() / student_BxK.shape[0]


def pointwise_kl(
    student_BxN: jax.Array, teacher_BxN: jax.Array, passage_mask_BxN: jax.Array) -> jax.Array:
  """L_KD: KL(softmax(teacher) || softmax(student)) per query, KLDivLoss(reduction='batchmean').

  Masked passage slots are left out of both softmaxes. Both inputs are already temperature-scaled.
  """
  if student_BxN.shape != teacher_BxN.shape or student_BxN.shape != passage_mask_BxN.shape:
    raise ValueError(
        f"pointwise_kl needs equal [B,N] shapes; got student {student_BxN.shape}, teacher "
        f"{teacher_BxN.shape}, passage_mask {passage_mask_BxN.shape}.")
  mask_BxN = passage_mask_BxN.astype(bool)
  return _kl_batchmean(
      student_BxN.astype(jnp.float32), teacher_BxN.astype(jnp.float32), mask_BxN, mask_BxN)


def _pair_scores(
    student_BxN: jax.Array, pair_i_BxP: jax.Array, pair_j_BxP: jax.Array,
    pair_mask_BxP: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Student scores of both sides of every pair; padded pairs read slot 0, whatever index they hold."""
  i_BxP = jnp.where(pair_mask_BxP, pair_i_BxP.astype(jnp.int32), 0)
  j_BxP = jnp.where(pair_mask_BxP, pair_j_BxP.astype(jnp.int32), 0)
  return (jnp.take_along_axis(student_BxN, i_BxP, axis=1),
          jnp.take_along_axis(student_BxN, j_BxP, axis=1))


def pairwise_kl(
    student_BxN: jax.Array, pair_i_BxP: jax.Array, pair_j_BxP: jax.Array,
    pair_logp_BxP: jax.Array, pair_mask_BxP: jax.Array) -> jax.Array:
  """L_pair: mean over all valid pairs of the batch of KL([p, 1-p] || [σ(s_i-s_j), σ(s_j-s_i)]).

  p = exp(logp), clamped to at most 1. Teacher probabilities of exactly 0 or 1 give finite values
  (xlogy); padded pairs contribute nothing to the value or the gradient; 0 when no pair is valid.
  """
  if not pair_i_BxP.shape == pair_j_BxP.shape == pair_logp_BxP.shape == pair_mask_BxP.shape:
    raise ValueError(
        f"pairwise_kl needs equal [B,P] pair shapes; got pair_i {pair_i_BxP.shape}, pair_j "
        f"{pair_j_BxP.shape}, pair_logp {pair_logp_BxP.shape}, pair_mask {pair_mask_BxP.shape}.")
  mask_BxP = pair_mask_BxP.astype(bool)
  s_i_BxP, s_j_BxP = _pair_scores(student_BxN.astype(jnp.float32), pair_i_BxP, pair_j_BxP, mask_BxP)
  logp_BxP = jnp.where(mask_BxP, jnp.minimum(pair_logp_BxP.astype(jnp.float32), 0.0), 0.0)
  p_BxP = jnp.exp(logp_BxP)
  q_BxP = -jnp.expm1(logp_BxP)
  diff_BxP = s_i_BxP - s_j_BxP
  kl_BxP = (xlogy(p_BxP, p_BxP) + xlogy(q_BxP, q_BxP)
            - p_BxP * jax.nn.log_sigmoid(diff_BxP) - q_BxP * jax.nn.log_sigmoid(-diff_BxP))
  num_pairs = mask_BxP.sum().astype(jnp.float32)
  return jnp.where(mask_BxP, kl_BxP, 0.0).sum() / jnp.maximum(num_pairs, 1.0)


def colbert_in_batch_ce(
    scores_BxGN: jax.Array, passage_mask_BxN: jax.Array, group_size: int) -> jax.Array:
  """L_IB: CE of each query against its own passage 0 among the other group members' valid passages.

  scores_BxGN[b, c*N + n] is query b against passage n of the c-th query of b's group (groups are runs
  of group_size consecutive queries; b's own block is c = b % group_size). The query's own passages
  1..N-1 are left out, as in ColBERT's compute_ib_loss. Raw scores; mean over queries.
  """
  b, n = passage_mask_BxN.shape
  if group_size < 1 or b % group_size:
    raise ValueError(
        f"in-batch group size {group_size} must be >= 1 and divide the batch size {b}; set "
        "loss.in_batch_group to a divisor of the batch (the batch size itself for the whole batch).")
  if scores_BxGN.shape != (b, group_size * n):
    raise ValueError(
        f"in-batch scores have shape {scores_BxGN.shape}; expected (B, group_size*N) = "
        f"({b}, {group_size * n}) for group_size {group_size} and N {n}.")
  scores_BxGxN = scores_BxGN.astype(jnp.float32).reshape(b, group_size, n)
  group_mask_BxGxN = jnp.broadcast_to(
      passage_mask_BxN.astype(bool).reshape(b // group_size, 1, group_size, n),
      (b // group_size, group_size, group_size, n)).reshape(b, group_size, n)
  own_block_B = jnp.arange(b) % group_size
  own_BxG = own_block_B[:, None] == jnp.arange(group_size)[None, :]
  candidates_BxGxN = jnp.where(own_BxG[:, :, None], jnp.arange(n) == 0, group_mask_BxGxN)
  logits_BxGN = jnp.where(candidates_BxGxN, scores_BxGxN, _EXCLUDED).reshape(b, group_size * n)
  # A select, not an indexed gather: XLA would all-gather the gather's indices across batch shards.
  positive_B = jnp.where(own_BxG, scores_BxGxN[:, :, 0], 0.0).sum(axis=1)
  return jnp.mean(jax.nn.logsumexp(logits_BxGN, axis=-1) - positive_B)


def dpr_in_batch_ce(scores_BxBN: jax.Array, passage_mask_BxN: jax.Array) -> jax.Array:
  """DPR's contrastive loss: CE of each query against its own passage 0 (the teacher's top passage) among
  every valid passage of the batch (its own others are hard negatives); mean over queries."""
  b, n = passage_mask_BxN.shape
  if scores_BxBN.shape != (b, b * n):
    raise ValueError(f"dpr_in_batch_ce needs scores (B, B*N) = ({b}, {b * n}); got {scores_BxBN.shape}.")
  mask_BxBN = jnp.broadcast_to(passage_mask_BxN.astype(bool).reshape(1, b * n), (b, b * n))
  logits_BxBN = jnp.where(mask_BxBN, scores_BxBN.astype(jnp.float32), _EXCLUDED)
  positive_BxBN = (jnp.arange(b * n)[None, :] == (jnp.arange(b) * n)[:, None])
  positive_B = jnp.where(positive_BxBN, logits_BxBN, 0.0).sum(axis=1)  # a select, not a gather (see above)
  return jnp.mean(jax.nn.logsumexp(logits_BxBN, axis=-1) - positive_B)


def dpr_global_kl(
    student_BxBN: jax.Array, teacher_BxN: jax.Array, passage_mask_BxN: jax.Array) -> jax.Array:
  """DPR's KL over every passage of the global batch, 'batchmean'.

  student_BxBN[b, c*N + n] is query b against passage n of query c (already temperature-scaled). The
  teacher matrix is -1e9 (probability 0) outside b's own N columns and on its masked slots; masked
  passage columns are left out of the student softmax too.
  """
  b, n = teacher_BxN.shape
  if student_BxBN.shape != (b, b * n) or passage_mask_BxN.shape != (b, n):
    raise ValueError(
        f"dpr_global_kl needs student (B, B*N) = ({b}, {b * n}) and passage_mask (B, N) = ({b}, {n}); "
        f"got {student_BxBN.shape} and {passage_mask_BxN.shape}.")
  mask_BxN = passage_mask_BxN.astype(bool)
  own_BxBxN = jnp.eye(b, dtype=bool)[:, :, None] & mask_BxN[:, None, :]
  teacher_BxBxN = jnp.broadcast_to(teacher_BxN.astype(jnp.float32)[:, None, :], (b, b, n))
  student_mask_BxBxN = jnp.broadcast_to(mask_BxN[None, :, :], (b, b, n))
  return _kl_batchmean(
      student_BxBN.astype(jnp.float32), teacher_BxBxN.reshape(b, b * n),
      student_mask_BxBxN.reshape(b, b * n), own_BxBxN.reshape(b, b * n))


def _ranking_metrics(student_BxN: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """pair_agreement, num_pairs and top1_agreement of the student's own-passage scores."""
  pair_mask_BxP = batch["pair_mask"].astype(bool)
  s_i_BxP, s_j_BxP = _pair_scores(student_BxN, batch["pair_i"], batch["pair_j"], pair_mask_BxP)
  teacher_prefers_i_BxP = batch["pair_logp"].astype(jnp.float32) > jnp.log(0.5)
  agree_BxP = jnp.where(teacher_prefers_i_BxP, s_i_BxP > s_j_BxP, s_j_BxP > s_i_BxP) & pair_mask_BxP
  num_pairs = pair_mask_BxP.sum().astype(jnp.float32)
  passage_mask_BxN = batch["passage_mask"].astype(bool)
  student_top_B = jnp.argmax(jnp.where(passage_mask_BxN, student_BxN, _EXCLUDED), axis=-1)
  teacher_top_B = jnp.argmax(
      jnp.where(passage_mask_BxN, batch["teacher"].astype(jnp.float32), _EXCLUDED), axis=-1)
  return {
      "pair_agreement": agree_BxP.sum().astype(jnp.float32) / jnp.maximum(num_pairs, 1.0),
      "num_pairs": num_pairs,
      "top1_agreement": jnp.mean((student_top_B == teacher_top_B).astype(jnp.float32)),
  }


def _check_inputs(batch: Mapping[str, jax.Array], temperature: float) -> None:
  missing = [key for key in TARGET_KEYS if key not in batch]
  if missing:
    raise KeyError(f"loss batch lacks {missing}; it needs all of {list(TARGET_KEYS)}.")
  if not temperature > 0:
    raise ValueError(f"loss.temperature must be > 0; got {temperature}.")


def colbert_loss(
    scores_BxN: jax.Array, ib_scores_BxGN: jax.Array | None, batch: Mapping[str, jax.Array], *,
    temperature: float, pair_alpha: float, in_batch_group: int, kd_weight: float = 1.0) -> tuple[jax.Array, dict]:
  """ColBERT total: kd_weight·L_KD(s/τ) + pair_alpha·L_pair(s/τ) + L_IB(raw in-batch scores).

  kd_weight 1 is the paper's; 0 (with pair_alpha 0) leaves the in-batch loss alone, a control.
  ib_scores_BxGN is None when in-batch negatives are off (L_IB = 0). Returns (loss, float32 metrics).
  """
  _check_inputs(batch, temperature)
  scores_BxN = scores_BxN.astype(jnp.float32)
  scaled_BxN = scores_BxN / temperature
  loss_kd = pointwise_kl(scaled_BxN, batch["teacher"], batch["passage_mask"])
  loss_pair = pairwise_kl(
      scaled_BxN, batch["pair_i"], batch["pair_j"], batch["pair_logp"], batch["pair_mask"])
  if ib_scores_BxGN is None:
    loss_ib = jnp.zeros((), jnp.float32)
  else:
    loss_ib = colbert_in_batch_ce(ib_scores_BxGN, batch["passage_mask"], in_batch_group)
  loss = kd_weight * loss_kd + pair_alpha * loss_pair + loss_ib
  metrics = {"loss": loss, "loss_kd": loss_kd, "loss_pair": loss_pair, "loss_ib": loss_ib}
  return loss, metrics | _ranking_metrics(scores_BxN, batch)


def _scale_gradient(x: jax.Array, factor: float) -> jax.Array:
  """x's value, with its gradient multiplied by factor."""
  x_sg = jax.lax.stop_gradient(x)
  return x_sg + factor * (x - x_sg)


def _per_worker_pairwise_kl(
    own_BxN: jax.Array, batch: Mapping[str, jax.Array], workers: int) -> jax.Array:
  """Mean over `workers` contiguous query blocks of each block's pairwise_kl (a mean over its own pairs)."""
  b = own_BxN.shape[0]
  blocks = [x.reshape(workers, b // workers, -1) for x in (
      own_BxN, batch["pair_i"], batch["pair_j"], batch["pair_logp"], batch["pair_mask"])]
  return jnp.mean(jax.vmap(pairwise_kl)(*blocks))


def dpr_loss(
    scores_BxBN: jax.Array, batch: Mapping[str, jax.Array], *, temperature: float,
    pair_alpha: float, workers: int = 0, kd_weight: float = 1.0, in_batch: bool = False) -> tuple[jax.Array, dict]:
  """DPR total: kd_weight·global KL(S/τ) + pair_alpha·L_pair on each query's own-block scores / τ
  [+ dpr_in_batch_ce(S/τ) when in_batch]; the paper's is kd_weight 1 without in_batch.

  scores_BxBN[b, c*N + n] is query b against passage n of query c over the global batch.
  workers 0 or 1: the exact gradient of this loss. workers W >= 2: the gradient of the original dpr-scale
  trainer on W GPUs, each holding a contiguous block of B/W queries: each GPU computes the global KL with
  the other GPUs' gathered vectors detached plus the pair loss of its own queries, and DDP averages the
  GPUs' gradients. Every vector's gradient then comes whole from its own GPU, divided by W: the gradient of
  KL/W + pair_alpha·mean_w L_pair(w), L_pair(w) the mean over block w's pairs.
  The reported loss is the mean of the W GPUs' losses, KL + pair_alpha·mean_w L_pair(w) (loss_pair:
  mean_w L_pair(w)); with as many pairs in every block it equals the workers=0 value.
  Returns (loss, float32 metrics).
  """
  _check_inputs(batch, temperature)
  b, n = batch["teacher"].shape
  if workers < 0 or b % max(workers, 1):
    raise ValueError(
        f"dpr workers {workers} must be >= 0 and divide the batch size {b}; set loss.dpr_workers to 0 "
        "(the exact gradient) or to a divisor of the micro-batch.")
  w = max(workers, 1)
  scaled_BxBN = scores_BxBN.astype(jnp.float32) / temperature
  loss_kd = dpr_global_kl(scaled_BxBN, batch["teacher"], batch["passage_mask"])
  own_BxN = scaled_BxBN.reshape(b, b, n)[jnp.arange(b), jnp.arange(b)]
  loss_pair = _per_worker_pairwise_kl(own_BxN, batch, w)
  loss = kd_weight * _scale_gradient(loss_kd, 1.0 / w) + pair_alpha * loss_pair
  metrics = {"loss": loss, "loss_kd": loss_kd, "loss_pair": loss_pair}
  if in_batch:
    metrics["loss_ib"] = dpr_in_batch_ce(scaled_BxBN, batch["passage_mask"])
    loss = metrics["loss"] = loss + metrics["loss_ib"]
  return loss, metrics | _ranking_metrics(own_BxN, batch)

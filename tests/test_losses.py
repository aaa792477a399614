"""Tests for pairdistill_jax.losses against float64 numpy references and PyTorch transcriptions."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pairdistill_jax import losses

RTOL = 1e-5
ATOL = 1e-6

# ----------------------------------------------------------------------------------------------------
# float64 references, written from docs/design.md §2.4 with explicit loops.


def _lse(x) -> float:
  x = np.asarray(x, np.float64)
  m = x.max()
  return float(m + np.log(np.exp(x - m).sum()))


def _sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x))


def ref_pointwise_kl(s, t, mask) -> float:
  total = 0.0
  for b in range(s.shape[0]):
    v = np.flatnonzero(mask[b])
    log_q = s[b, v] - _lse(s[b, v])
    log_p = t[b, v] - _lse(t[b, v])
    total += np.sum(np.exp(log_p) * (log_p - log_q))
  return total / s.shape[0]


def ref_pair_kl(s, pairs) -> float:
  """pairs: list of (query, i, j, logp)."""
  if not pairs:
    return 0.0
  total = 0.0
  for b, i, j, logp in pairs:
    p = math.exp(logp)
    norm = _lse([s[b, i], s[b, j]])
    for target, log_q in ((p, s[b, i] - norm), (1.0 - p, s[b, j] - norm)):
      if target > 0:
        total += target * (math.log(target) - log_q)
  return total / len(pairs)


def ref_pair_kl_grad(s, pairs) -> np.ndarray:
  """Hand derivative: d KL / d s_i = σ(s_i - s_j) - p, and its negative for s_j; mean over pairs."""
  grad = np.zeros_like(s, dtype=np.float64)
  for b, i, j, logp in pairs:
    g = _sigmoid(s[b, i] - s[b, j]) - math.exp(logp)
    grad[b, i] += g / len(pairs)
    grad[b, j] -= g / len(pairs)
  return grad


def ref_in_batch_ce(scores, mask, group) -> float:
  batch, nway = mask.shape
  ces = []
  for b in range(batch):
    first, own = (b // group) * group, b % group
    logits = [scores[b, own * nway]]
    for c in range(group):
      if c != own:
        logits += [scores[b, c * nway + n] for n in range(nway) if mask[first + c, n]]
    ces.append(_lse(logits) - scores[b, own * nway])
  return float(np.mean(ces))


def ref_dpr_kl(s, t, mask) -> float:
  batch, nway = t.shape
  columns = np.flatnonzero(mask.reshape(-1))
  total = 0.0
  for b in range(batch):
    own = np.flatnonzero(mask[b])
    log_p = t[b, own] - _lse(t[b, own])
    log_q = s[b, b * nway + own] - _lse(s[b, columns])
    total += np.sum(np.exp(log_p) * (log_p - log_q))
  return total / batch


def own_blocks(scores_bxbn, nway):
  batch = scores_bxbn.shape[0]
  return np.stack([scores_bxbn[b, b * nway:(b + 1) * nway] for b in range(batch)])


def ref_colbert_total(scores, ib, t, mask, pairs, tau, alpha, group) -> float:
  ib_term = 0.0 if ib is None else ref_in_batch_ce(ib, mask, group)
  return ref_pointwise_kl(scores / tau, t, mask) + alpha * ref_pair_kl(scores / tau, pairs) + ib_term


def ref_dpr_total(scores, t, mask, pairs, tau, alpha) -> float:
  nway = t.shape[1]
  return ref_dpr_kl(scores / tau, t, mask) + alpha * ref_pair_kl(own_blocks(scores, nway) / tau, pairs)


# ----------------------------------------------------------------------------------------------------
# PyTorch transcriptions of the original code.


def torch_kldiv_batchmean(s, t) -> float:
  log_q = torch.log_softmax(torch.tensor(s, dtype=torch.float64), -1)
  log_p = torch.log_softmax(torch.tensor(t, dtype=torch.float64), -1)
  return torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(log_q, log_p).item()


def torch_colbert_ib(scores, nway) -> float:
  """ColBERT compute_ib_loss for one group: scores[q, d] with D = Q*nway documents, query-major."""
  n_queries, n_docs = scores.shape
  all_except_self_negatives = [
      list(range(q * n_docs, q * n_docs + nway * q + 1))
      + list(range(q * n_docs + nway * (q + 1), q * n_docs + n_docs)) for q in range(n_queries)]
  flat = [k for row in all_except_self_negatives for k in row]
  picked = torch.tensor(scores, dtype=torch.float64).flatten()[flat].view(n_queries, -1)
  labels = torch.arange(n_queries) * nway
  return torch.nn.CrossEntropyLoss()(picked, labels).item()


def torch_dpr_kl(scores, teacher, tau) -> float:
  """dpr-scale DPRPairDistillTask without distributed gather: -1e9 teacher outside own columns."""
  batch, nway = teacher.shape
  full = torch.full((batch, batch * nway), -1e9, dtype=torch.float64)
  for i in range(batch):
    full[i, i * nway:(i + 1) * nway] = torch.tensor(teacher[i], dtype=torch.float64)
  log_q = torch.log_softmax(torch.tensor(scores, dtype=torch.float64) / tau, -1)
  log_p = torch.log_softmax(full, -1)
  return torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(log_q, log_p).item()


def torch_dpr_pair_distill_loss(scores, pair_scores):
  """dpr-scale DPRPairDistillTask._pair_distill_loss; pair_scores[b][i] = [(j, logp), ...]."""
  pairs = [(b, i, j, math.exp(logp)) for b, per_query in enumerate(pair_scores)
           for i, passage_pairs in enumerate(per_query) for j, logp in passage_pairs]
  if not pairs:
    return torch.tensor(0.0, dtype=torch.float64)
  kl_div = torch.nn.KLDivLoss(reduction="batchmean", log_target=False)
  loss = 0.0
  for b, i, j, p in pairs:
    loss += kl_div(torch.log_softmax(scores[b][[i, j]], dim=-1).unsqueeze(0),
                   torch.tensor([p, 1 - p], dtype=torch.float64).unsqueeze(0))
  return loss / len(pairs)


def torch_dpr_ddp(q, p, teacher, pairs, tau, alpha, world_size):
  """dpr-scale DPRPairDistillTask.training_step on world_size DDP ranks, in float64.

  Rank r holds queries r*B/W... and their passages; all_gather hands it the others' vectors detached. The
  replicated "parameters" are the vector tables q [B,D] and p [B*N,D] (a rank's forward picks its rows), so
  DDP's gradient is the mean over ranks of each rank's gradient. Returns (mean of the ranks' losses, mean
  of their pair losses, DDP gradient of q, of p).
  """
  batch, nway = teacher.shape
  queries_per_node, contexts_per_node = batch // world_size, batch // world_size * nway
  q_table = torch.tensor(q, dtype=torch.float64, requires_grad=True)
  p_table = torch.tensor(p, dtype=torch.float64, requires_grad=True)
  all_query_repr = q_table.detach().view(world_size, queries_per_node, -1)
  all_context_repr = p_table.detach().view(world_size, contexts_per_node, -1)
  all_target_scores = torch.tensor(teacher, dtype=torch.float64).view(world_size, queries_per_node, nway)
  losses_, pair_losses = [], []
  for rank in range(world_size):
    query_repr = q_table[rank * queries_per_node:(rank + 1) * queries_per_node]
    context_repr = p_table[rank * contexts_per_node:(rank + 1) * contexts_per_node]
    target_scores = torch.full((batch, batch * nway), -1e9, dtype=torch.float64)
    all_query_list, all_context_list = [], []
    for i in range(world_size):
      all_query_list.append(query_repr if i == rank else all_query_repr[i])
      all_context_list.append(context_repr if i == rank else all_context_repr[i])
      for j in range(queries_per_node):
        target_scores[i * queries_per_node + j, i * contexts_per_node + j * nway:
                      i * contexts_per_node + (j + 1) * nway] = all_target_scores[i][j]
    scores = torch.cat(all_query_list) @ torch.cat(all_context_list).T / tau
    loss = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(
        torch.log_softmax(scores, -1), torch.log_softmax(target_scores, -1))
    scores_this_node = torch.stack([
        scores[rank * queries_per_node + i, rank * contexts_per_node + i * nway:
               rank * contexts_per_node + (i + 1) * nway] for i in range(queries_per_node)])
    pair_scores = [[[] for _ in range(nway)] for _ in range(queries_per_node)]
    for b, i, j, logp in pairs:
      if b // queries_per_node == rank:
        pair_scores[b % queries_per_node][i].append((j, logp))
    pair_loss = torch_dpr_pair_distill_loss(scores_this_node, pair_scores)
    loss = loss + pair_loss * alpha
    loss.backward()  # accumulates into the tables' .grad: the sum over ranks
    losses_.append(loss.item())
    pair_losses.append(pair_loss.item())
  return (np.mean(losses_), np.mean(pair_losses), q_table.grad.numpy() / world_size,
          p_table.grad.numpy() / world_size)


# ----------------------------------------------------------------------------------------------------
# Inputs.


def random_pairs(rng, batch, nway, per_query, mask=None):
  pairs = []
  for b in range(batch):
    valid = np.arange(nway) if mask is None else np.flatnonzero(mask[b])
    for _ in range(per_query[b]):
      i, j = rng.choice(valid, 2, replace=False)
      pairs.append((b, int(i), int(j), float(np.log(rng.uniform(0.02, 0.98)))))
  return pairs


def pack_pairs(rng, pairs, batch, max_pairs):
  """Pads pairs into [B,P] arrays at random slots; padded slots hold garbage indices and logp."""
  pair_i = rng.integers(-50, 50, (batch, max_pairs)).astype(np.int32)
  pair_j = rng.integers(-50, 50, (batch, max_pairs)).astype(np.int32)
  garbage = np.array([np.nan, np.inf, -np.inf, 7.0, -3.0, 0.0], np.float32)
  pair_logp = rng.choice(garbage, (batch, max_pairs)).astype(np.float32)
  pair_mask = np.zeros((batch, max_pairs), bool)
  for b in range(batch):
    mine = [p for p in pairs if p[0] == b]
    slots = rng.choice(max_pairs, len(mine), replace=False)
    for slot, (_, i, j, logp) in zip(slots, mine):
      pair_i[b, slot], pair_j[b, slot], pair_logp[b, slot], pair_mask[b, slot] = i, j, logp, True
  return {"pair_i": pair_i, "pair_j": pair_j, "pair_logp": pair_logp, "pair_mask": pair_mask}


def make_batch(rng, teacher, mask, pairs, max_pairs):
  return {"teacher": teacher.astype(np.float32), "passage_mask": mask,
          **pack_pairs(rng, pairs, teacher.shape[0], max_pairs)}


def pair_args(batch):
  return (batch["pair_i"], batch["pair_j"], batch["pair_logp"], batch["pair_mask"])


def random_mask(rng, batch, nway, keep_first=True):
  mask = rng.uniform(size=(batch, nway)) > 0.3
  mask[:, 0] = keep_first
  mask[:, 1] = True
  return mask


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------
# pointwise_kl


def test_pointwise_kl_matches_torch_kldivloss():
  rng = np.random.default_rng(0)
  s, t = rng.normal(0, 3, (5, 7)), rng.normal(0, 4, (5, 7))
  mask = np.ones((5, 7), bool)
  got = jax.jit(losses.pointwise_kl)(s.astype(np.float32), t.astype(np.float32), mask)
  close(got, torch_kldiv_batchmean(s, t))


def test_pointwise_kl_masked_slots_excluded_from_value_and_gradient():
  rng = np.random.default_rng(1)
  s, t = rng.normal(0, 3, (4, 6)), rng.normal(0, 4, (4, 6))
  mask = random_mask(rng, 4, 6)
  s_garbage = np.where(mask, s, 1e4).astype(np.float32)
  t_garbage = np.where(mask, t, -1e4).astype(np.float32)
  value, grad = jax.value_and_grad(losses.pointwise_kl)(s_garbage, t_garbage, mask)
  close(value, ref_pointwise_kl(s, t, mask))
  # Hand derivative: (softmax(s) - softmax(t)) / B over valid slots, 0 on masked ones.
  expected = np.zeros_like(s)
  for b in range(4):
    v = np.flatnonzero(mask[b])
    expected[b, v] = (np.exp(s[b, v] - _lse(s[b, v])) - np.exp(t[b, v] - _lse(t[b, v]))) / 4
  close(grad, expected, atol=1e-6)
  assert np.all(np.asarray(grad)[~mask] == 0)


def test_pointwise_kl_query_without_valid_passage_counts_in_batchmean():
  rng = np.random.default_rng(17)
  s, t = rng.normal(0, 3, (3, 4)), rng.normal(0, 4, (3, 4))
  mask = np.ones((3, 4), bool)
  mask[1] = False
  value, grad = jax.value_and_grad(losses.pointwise_kl)(
      s.astype(np.float32), t.astype(np.float32), mask)
  # KLDivLoss 'batchmean' divides by all B rows; the empty row adds nothing.
  full_rows = [ref_pointwise_kl(s[[b]], t[[b]], mask[[b]]) for b in (0, 2)]
  close(value, sum(full_rows) / 3)
  assert np.all(np.asarray(grad)[1] == 0)


# ----------------------------------------------------------------------------------------------------
# pairwise_kl


def test_pairwise_kl_random_with_padding_matches_reference_value_and_gradient():
  rng = np.random.default_rng(2)
  batch, nway, max_pairs = 4, 8, 6
  s = rng.normal(0, 3, (batch, nway))
  pairs = random_pairs(rng, batch, nway, per_query=[6, 2, 0, 4])
  packed = pack_pairs(rng, pairs, batch, max_pairs)
  fn = jax.jit(jax.value_and_grad(losses.pairwise_kl))
  value, grad = fn(s.astype(np.float32), *pair_args(packed))
  close(value, ref_pair_kl(s, pairs))
  close(grad, ref_pair_kl_grad(s, pairs))
  assert np.all(np.isfinite(grad))


def test_pairwise_kl_mean_is_over_all_pairs_not_per_query():
  s = np.array([[2.0, 0.0], [0.0, 0.0]])
  pairs = [(0, 0, 1, math.log(0.5))] * 3 + [(1, 0, 1, math.log(0.5))]
  packed = pack_pairs(np.random.default_rng(3), pairs, 2, 3)
  got = losses.pairwise_kl(s.astype(np.float32), *pair_args(packed))
  # KL([.5,.5] || [σ(2), σ(-2)]) three times, 0 once; mean over 4 pairs.
  one = (0.5 * (math.log(0.5) - math.log(_sigmoid(2.0)))
         + 0.5 * (math.log(0.5) - math.log(_sigmoid(-2.0))))
  close(got, 3 * one / 4)


def test_pairwise_kl_teacher_probability_exactly_zero_and_one_is_finite():
  rng = np.random.default_rng(4)
  s = rng.normal(0, 3, (2, 5))
  pairs = [(0, 0, 1, 0.0), (0, 2, 3, -1e4), (1, 4, 0, 0.0), (1, 1, 2, -1e4), (1, 3, 2, math.log(0.3))]
  packed = pack_pairs(rng, pairs, 2, 4)
  value, grad = jax.value_and_grad(losses.pairwise_kl)(s.astype(np.float32), *pair_args(packed))
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  close(value, ref_pair_kl(s, pairs))
  close(grad, ref_pair_kl_grad(s, pairs))


def test_pairwise_kl_extreme_student_margins_are_finite():
  s = np.array([[80.0, -80.0, 0.0]], np.float32)
  pairs = [(0, 0, 1, -1e4), (0, 1, 0, 0.0), (0, 0, 1, 0.0)]
  packed = pack_pairs(np.random.default_rng(5), pairs, 1, 4)
  value, grad = jax.value_and_grad(losses.pairwise_kl)(s, *pair_args(packed))
  close(value, ref_pair_kl(s.astype(np.float64), pairs), rtol=1e-5)
  close(grad, ref_pair_kl_grad(s.astype(np.float64), pairs))


def test_pairwise_kl_no_valid_pair_is_zero_with_zero_gradient():
  rng = np.random.default_rng(6)
  s = rng.normal(0, 3, (3, 4)).astype(np.float32)
  packed = pack_pairs(rng, [], 3, 5)
  value, grad = jax.value_and_grad(losses.pairwise_kl)(s, *pair_args(packed))
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


# ----------------------------------------------------------------------------------------------------
# colbert_in_batch_ce


def test_in_batch_ce_whole_batch_matches_colbert_compute_ib_loss():
  rng = np.random.default_rng(7)
  batch, nway = 4, 3
  scores = rng.normal(0, 5, (batch, batch * nway))
  mask = np.ones((batch, nway), bool)
  got = jax.jit(losses.colbert_in_batch_ce, static_argnums=2)(scores.astype(np.float32), mask, batch)
  close(got, torch_colbert_ib(scores, nway))
  close(got, ref_in_batch_ce(scores, mask, batch))


def test_in_batch_ce_group_of_two_in_a_batch_of_four():
  rng = np.random.default_rng(8)
  batch, nway, group = 4, 3, 2
  scores = rng.normal(0, 5, (batch, group * nway))
  mask = np.ones((batch, nway), bool)
  got = losses.colbert_in_batch_ce(scores.astype(np.float32), mask, group)
  expected = np.mean([torch_colbert_ib(scores[:2], nway), torch_colbert_ib(scores[2:], nway)])
  close(got, expected)


def test_in_batch_ce_masked_passages_of_other_queries_are_excluded():
  rng = np.random.default_rng(9)
  batch, nway, group = 4, 4, 2
  mask = random_mask(rng, batch, nway)
  scores = rng.normal(0, 5, (batch, group * nway))
  garbage = scores.copy()
  for b in range(batch):
    first = (b // group) * group
    for c in range(group):
      block = slice(c * nway, (c + 1) * nway)
      garbage[b, block] = np.where(mask[first + c], scores[b, block], 1e4)
  got = losses.colbert_in_batch_ce(garbage.astype(np.float32), mask, group)
  close(got, ref_in_batch_ce(scores, mask, group))


@pytest.mark.parametrize("group, width", [(3, 3 * 2), (2, 4 * 2), (0, 0)])
def test_in_batch_ce_rejects_bad_group(group, width):
  with pytest.raises(ValueError, match="in-batch"):
    losses.colbert_in_batch_ce(np.zeros((4, width), np.float32), np.ones((4, 2), bool), group)


# ----------------------------------------------------------------------------------------------------
# dpr_global_kl


def test_dpr_global_kl_matches_dpr_scale_transcription():
  rng = np.random.default_rng(10)
  batch, nway, tau = 3, 4, 2.5
  scores, teacher = rng.normal(0, 5, (batch, batch * nway)), rng.normal(0, 4, (batch, nway))
  mask = np.ones((batch, nway), bool)
  got = jax.jit(losses.dpr_global_kl)(
      (scores / tau).astype(np.float32), teacher.astype(np.float32), mask)
  close(got, torch_dpr_kl(scores, teacher, tau))
  close(got, ref_dpr_kl(scores / tau, teacher, mask))


def test_dpr_global_kl_teacher_mask_and_masked_columns():
  rng = np.random.default_rng(11)
  batch, nway = 3, 5
  scores, teacher = rng.normal(0, 5, (batch, batch * nway)), rng.normal(0, 4, (batch, nway))
  mask = random_mask(rng, batch, nway)
  column_mask = np.broadcast_to(mask.reshape(1, -1), scores.shape)
  garbage_scores = np.where(column_mask, scores, 1e4).astype(np.float32)
  garbage_teacher = np.where(mask, teacher, 1e4).astype(np.float32)
  value, grad = jax.value_and_grad(losses.dpr_global_kl)(garbage_scores, garbage_teacher, mask)
  close(value, ref_dpr_kl(scores, teacher, mask))
  assert np.all(np.asarray(grad)[~column_mask] == 0)


# ----------------------------------------------------------------------------------------------------
# Totals.


def _colbert_case(seed, batch=4, nway=5, max_pairs=4, group=2):
  rng = np.random.default_rng(seed)
  mask = random_mask(rng, batch, nway)
  teacher = rng.normal(0, 4, (batch, nway))
  pairs = random_pairs(rng, batch, nway, per_query=rng.integers(0, max_pairs + 1, batch), mask=mask)
  scores = rng.normal(0, 5, (batch, nway))
  ib = rng.normal(0, 5, (batch, group * nway))
  return scores, ib, teacher, mask, pairs, make_batch(rng, teacher, mask, pairs, max_pairs)


@pytest.mark.parametrize("with_ib", [True, False])
def test_colbert_loss_combines_terms_with_weights_and_temperature(with_ib):
  scores, ib, teacher, mask, pairs, batch = _colbert_case(12)
  tau, alpha, group = 2.0, 3.0, 2
  ib = ib if with_ib else None
  fn = jax.jit(functools.partial(
      losses.colbert_loss, temperature=tau, pair_alpha=alpha, in_batch_group=group))
  loss, metrics = fn(scores.astype(np.float32), None if ib is None else ib.astype(np.float32), batch)
  close(metrics["loss_kd"], ref_pointwise_kl(scores / tau, teacher, mask))
  close(metrics["loss_pair"], ref_pair_kl(scores / tau, pairs))
  close(metrics["loss_ib"], 0.0 if ib is None else ref_in_batch_ce(ib, mask, group))
  close(loss, ref_colbert_total(scores, ib, teacher, mask, pairs, tau, alpha, group))
  close(metrics["loss"], float(loss))
  close(metrics["num_pairs"], len(pairs))
  assert {k: v.dtype for k, v in metrics.items()} == {k: jnp.float32 for k in metrics}


def test_dpr_loss_combines_terms_with_weights_and_temperature():
  rng = np.random.default_rng(13)
  batch_size, nway, max_pairs, tau, alpha = 3, 4, 3, 0.5, 1.5
  mask = random_mask(rng, batch_size, nway)
  teacher = rng.normal(0, 4, (batch_size, nway))
  pairs = random_pairs(rng, batch_size, nway, per_query=[3, 0, 2], mask=mask)
  scores = rng.normal(0, 5, (batch_size, batch_size * nway))
  batch = make_batch(rng, teacher, mask, pairs, max_pairs)
  fn = jax.jit(functools.partial(losses.dpr_loss, temperature=tau, pair_alpha=alpha))
  loss, metrics = fn(scores.astype(np.float32), batch)
  close(metrics["loss_kd"], ref_dpr_kl(scores / tau, teacher, mask))
  close(metrics["loss_pair"], ref_pair_kl(own_blocks(scores, nway) / tau, pairs))
  close(loss, ref_dpr_total(scores, teacher, mask, pairs, tau, alpha))
  assert "loss_ib" not in metrics


def _central_differences(f, x, eps=1e-6):
  grad = np.zeros_like(x)
  for k in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[k] += eps
    down[k] -= eps
    grad[k] = (f(up) - f(down)) / (2 * eps)
  return grad


def test_colbert_loss_gradient_matches_finite_differences():
  scores, ib, teacher, mask, _, _ = _colbert_case(14, batch=2, nway=3, max_pairs=2, group=2)
  mask[:] = True
  mask[1, 2] = False
  pairs = [(0, 0, 2, math.log(0.7)), (0, 1, 2, 0.0), (1, 0, 1, math.log(0.2))]
  batch = make_batch(np.random.default_rng(15), teacher, mask, pairs, 2)
  tau, alpha, group = 1.5, 3.0, 2

  def jax_loss(s, ib_s):
    return losses.colbert_loss(
        s, ib_s, batch, temperature=tau, pair_alpha=alpha, in_batch_group=group)[0]

  g_scores, g_ib = jax.jit(jax.grad(jax_loss, argnums=(0, 1)))(
      scores.astype(np.float32), ib.astype(np.float32))
  fd_scores = _central_differences(
      lambda s: ref_colbert_total(s, ib, teacher, mask, pairs, tau, alpha, group), scores)
  fd_ib = _central_differences(
      lambda x: ref_colbert_total(scores, x, teacher, mask, pairs, tau, alpha, group), ib)
  close(g_scores, fd_scores, rtol=1e-4, atol=1e-5)
  close(g_ib, fd_ib, rtol=1e-4, atol=1e-5)


def test_dpr_loss_gradient_matches_finite_differences():
  rng = np.random.default_rng(16)
  teacher = rng.normal(0, 4, (2, 3))
  mask = np.array([[True, True, True], [True, True, False]])
  scores = rng.normal(0, 3, (2, 6))
  pairs = [(0, 0, 1, math.log(0.9)), (1, 1, 0, -1e4), (1, 0, 1, math.log(0.4))]
  batch = make_batch(rng, teacher, mask, pairs, 2)
  tau, alpha = 0.7, 1.0
  grad = jax.jit(jax.grad(lambda s: losses.dpr_loss(s, batch, temperature=tau, pair_alpha=alpha)[0]))(
      scores.astype(np.float32))
  fd = _central_differences(lambda s: ref_dpr_total(s, teacher, mask, pairs, tau, alpha), scores)
  close(grad, fd, rtol=1e-4, atol=1e-5)


def _dpr_vectors_case(seed, batch=6, nway=3, dim=5, max_pairs=3):
  """Query and passage vectors, all passages valid (the original has no padding), pair counts uneven
  across the blocks of 2 and of 3 queries."""
  rng = np.random.default_rng(seed)
  q, p = rng.normal(0, 1, (batch, dim)), rng.normal(0, 1, (batch * nway, dim))
  teacher, mask = rng.normal(0, 4, (batch, nway)), np.ones((batch, nway), bool)
  pairs = random_pairs(rng, batch, nway, per_query=[3, 2, 0, 0, 1, 3])
  return q, p, teacher, pairs, make_batch(rng, teacher, mask, pairs, max_pairs)


def _jax_dpr_vectors(q, p, batch, tau, alpha, workers):
  """dpr_loss of scores q·p (column c*N + n: passage n of query c): (loss, metrics), (grad q, grad p)."""
  def loss_fn(q_BxD, p_BNxD):
    return losses.dpr_loss(q_BxD @ p_BNxD.T, batch, temperature=tau, pair_alpha=alpha, workers=workers)
  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
      q.astype(np.float32), p.astype(np.float32))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_dpr_workers_match_dpr_scale_ddp_transcription(workers):
  q, p, teacher, pairs, batch = _dpr_vectors_case(17)
  tau, alpha = 0.8, 1.5
  (loss, metrics), (grad_q, grad_p) = _jax_dpr_vectors(q, p, batch, tau, alpha, workers)
  ref_loss, ref_pair, ref_grad_q, ref_grad_p = torch_dpr_ddp(q, p, teacher, pairs, tau, alpha, workers)
  close(loss, ref_loss)
  close(metrics["loss"], ref_loss)
  close(metrics["loss_pair"], ref_pair)
  close(grad_q, ref_grad_q)
  close(grad_p, ref_grad_p)
  if workers > 1:  # the original's gradient is not the exact one
    _, (exact_q, _) = _jax_dpr_vectors(q, p, batch, tau, alpha, 0)
    assert np.abs(np.asarray(exact_q) - ref_grad_q).max() > 1e-2


def test_dpr_one_worker_is_the_default():
  q, p, _, _, batch = _dpr_vectors_case(18)
  (loss, metrics), grads = _jax_dpr_vectors(q, p, batch, 1.3, 1.0, 1)
  (ref_loss, ref_metrics), ref_grads = _jax_dpr_vectors(q, p, batch, 1.3, 1.0, 0)
  np.testing.assert_array_equal(loss, ref_loss)
  for key in ref_metrics:
    np.testing.assert_array_equal(metrics[key], ref_metrics[key], err_msg=key)
  for grad, ref_grad in zip(grads, ref_grads):
    np.testing.assert_array_equal(grad, ref_grad)


@pytest.mark.parametrize("workers", [-1, 4])
def test_dpr_workers_must_divide_the_batch(workers):
  _, _, _, _, batch = _dpr_vectors_case(19)
  with pytest.raises(ValueError, match="loss.dpr_workers"):
    losses.dpr_loss(np.zeros((6, 18), np.float32), batch, temperature=1.0, pair_alpha=1.0,
                    workers=workers)


# ----------------------------------------------------------------------------------------------------
# Metrics on crafted inputs.


def _metrics_batch():
  teacher = np.array([[1, 5, 2, 0], [3, 1, 0, 9], [0, 0, 1, 0]], np.float32)
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
  student = np.array([[4, 7, 2, 1], [5, 2, 3, 50], [0, 0, 0, 2]], np.float32)
  # Teacher prefers i iff logp > log 0.5; student ties count as disagreement.
  pair_i = np.array([[0, 1, 3], [1, 0, 3], [0, 0, 0]], np.int32)
  pair_j = np.array([[1, 2, 0], [2, 1, 0], [0, 0, 0]], np.int32)
  pair_logp = np.log(np.array([[0.9, 0.2, 0.3], [0.8, 0.6, 1.0], [0.5, 0.5, 0.5]], np.float32))
  pair_mask = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], bool)
  # q0: (0,1) teacher 0, student 7>4 -> disagree; (1,2) teacher 2, student 7>2 -> disagree;
  #     (3,0) teacher 0, student 4>1 -> agree. q1: (1,2) teacher 1, student 2<3 -> disagree;
  #     (0,1) teacher 0, student 5>2 -> agree; padded (3,0) would agree. => 2 of 5.
  # top1: q0 teacher 1, student 1 agree; q1 teacher 0 (9 masked), student 0 (50 masked) agree;
  #     q2 teacher 2, student 3 disagree. => 2 of 3.
  batch = {"teacher": teacher, "passage_mask": mask, "pair_i": pair_i, "pair_j": pair_j,
           "pair_logp": pair_logp, "pair_mask": pair_mask}
  return student, batch


def test_colbert_metrics_on_crafted_inputs():
  student, batch = _metrics_batch()
  _, metrics = losses.colbert_loss(
      student, None, batch, temperature=3.0, pair_alpha=1.0, in_batch_group=1)
  close(metrics["pair_agreement"], 2 / 5)
  close(metrics["num_pairs"], 5)
  close(metrics["top1_agreement"], 2 / 3)


def test_pair_agreement_counts_student_ties_as_disagreement():
  student = np.array([[1.0, 1.0, 0.0]], np.float32)
  batch = {"teacher": np.zeros((1, 3), np.float32), "passage_mask": np.ones((1, 3), bool),
           "pair_i": np.array([[0, 0, 2]], np.int32), "pair_j": np.array([[1, 2, 1]], np.int32),
           "pair_logp": np.log(np.array([[0.9, 0.9, 0.1]], np.float32)),
           "pair_mask": np.ones((1, 3), bool)}
  _, metrics = losses.colbert_loss(student, None, batch, temperature=1.0, pair_alpha=1.0,
                                   in_batch_group=1)
  close(metrics["pair_agreement"], 2 / 3)


def test_dpr_metrics_use_own_block_scores():
  student, batch = _metrics_batch()
  batch_size, nway = student.shape
  scores = np.full((batch_size, batch_size * nway), 100.0, np.float32)
  for b in range(batch_size):
    scores[b, b * nway:(b + 1) * nway] = student[b]
  _, metrics = losses.dpr_loss(scores, batch, temperature=2.0, pair_alpha=1.0)
  close(metrics["pair_agreement"], 2 / 5)
  close(metrics["top1_agreement"], 2 / 3)


def test_metrics_with_no_pairs_are_zero():
  student, batch = _metrics_batch()
  batch = batch | {"pair_mask": np.zeros_like(batch["pair_mask"])}
  _, metrics = losses.colbert_loss(student, None, batch, temperature=1.0, pair_alpha=3.0,
                                   in_batch_group=1)
  assert float(metrics["pair_agreement"]) == 0.0
  assert float(metrics["num_pairs"]) == 0.0
  assert float(metrics["loss_pair"]) == 0.0


# ----------------------------------------------------------------------------------------------------
# Input errors.


def test_totals_reject_bad_temperature_and_missing_keys():
  student, batch = _metrics_batch()
  with pytest.raises(ValueError, match="temperature"):
    losses.colbert_loss(student, None, batch, temperature=0.0, pair_alpha=1.0, in_batch_group=1)
  with pytest.raises(KeyError, match="pair_logp"):
    losses.dpr_loss(np.zeros((3, 12), np.float32),
                    {k: v for k, v in batch.items() if k != "pair_logp"},
                    temperature=1.0, pair_alpha=1.0)


def test_dpr_in_batch_ce_matches_torch_cross_entropy_over_the_batch():
  """dpr-scale's contrastive loss: each query's positive (passage 0) against every valid passage of the batch."""
  rng = np.random.default_rng(7)
  b, n = 3, 4
  scores = rng.normal(size=(b, b * n)).astype(np.float32) * 3
  mask = np.ones((b, n), bool)
  mask[1, 3] = mask[2, 2] = False
  keep = mask.reshape(-1)
  expected = torch.nn.functional.cross_entropy(torch.tensor(scores[:, keep], dtype=torch.float64),
                                               torch.tensor([int(keep[:c * n].sum()) for c in range(b)]))
  close(float(losses.dpr_in_batch_ce(jnp.asarray(scores), jnp.asarray(mask))), float(expected))


def test_kd_weight_zero_leaves_the_contrastive_control():
  rng = np.random.default_rng(3)
  b, n = 4, 3
  scores = jnp.asarray(rng.normal(size=(b, b * n)).astype(np.float32))
  mask = np.ones((b, n), bool)
  batch = make_batch(rng, rng.normal(size=(b, n)).astype(np.float32), mask, random_pairs(rng, b, n, [2] * b), 4)
  loss, metrics = losses.dpr_loss(scores, batch, temperature=1.0, pair_alpha=0.0, kd_weight=0.0, in_batch=True)
  close(float(loss), float(losses.dpr_in_batch_ce(scores, jnp.asarray(mask))))
  assert float(metrics["loss_kd"]) > 0  # still reported
  full, _ = losses.dpr_loss(scores, batch, temperature=1.0, pair_alpha=1.0)
  kd_only, _ = losses.dpr_loss(scores, batch, temperature=1.0, pair_alpha=0.0)
  half, _ = losses.dpr_loss(scores, batch, temperature=1.0, pair_alpha=1.0, kd_weight=0.5)
  close(float(half), float(full) - 0.5 * float(kd_only))

"""monoT5 / duoT5 teachers through --mode=score vs PyTorch T5ForConditionalGeneration; the teacher benchmark."""

import json

import numpy as np
import pytest
import sentencepiece
import tokenizers
import torch
import transformers
from tokenizers import models, pre_tokenizers, processors

from configs import colbert
from pairdistill_jax.bench import modes
from pairdistill_jax.data import formats
from pairdistill_jax.teachers import inputs, score

WORDS = "cat dog fish barks swims purrs water tree loud quiet small big".split()
PIECES = ["<pad>", "</s>", "<unk>", "▁Query:", "▁Document:", "▁Document0:", "▁Document1:", "▁Relevant:",
          *("▁" + w for w in WORDS)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A random T5 v1.1 (gated GELU, untied head) whose vocabulary reaches the "true"/"false" ids, and a tiny
  Unigram tokenizer whose pieces are whole words."""
  directory = tmp_path_factory.mktemp("t5_teacher")
  tok = tokenizers.Tokenizer(models.Unigram([(w, -1.0) for w in PIECES], unk_id=2))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                               extra_ids=0).save_pretrained(directory)
  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=6200, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                                 scale_decoder_outputs=False)  # v1.1: no d_model**-0.5 before the head
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)  # untied
  model.save_pretrained(directory)
  return directory


def _config(root, teacher_dir):
  c = colbert.get_config("demo")
  c.teacher.update(run=str(root / "run.trec"), output=str(root / "train.jsonl"), top_n=4, nway=4, topk=4,
                   max_distance=1, n_pairs=2, chunk_queries=2, bucket_multiple=8)
  for role, scorer in (("pointwise", "monot5"), ("pairwise", "duot5")):
    c.teacher[role].update(scorer=scorer, model=str(teacher_dir), max_length=64, dtype="float32", batch_per_device=2)
  return c


def _log_p_true(model, tokenizer, prompt: str) -> float:
  ids = tokenizer(prompt, return_tensors="pt").input_ids
  with torch.no_grad():
    logits = model(input_ids=ids, decoder_input_ids=torch.zeros((1, 1), dtype=torch.long)).logits[0, 0]
  pair = logits[[inputs.T5_TRUE_ID, inputs.T5_FALSE_ID]].double()
  return float(pair[0] - torch.logsumexp(pair, 0))  # log P(true) by hand


def test_t5_teachers_score_like_torch(tmp_path, teacher_dir):
  rng = np.random.default_rng(0)
  text = lambda n: " ".join(rng.choice(WORDS, size=n))  # noqa: E731
  collection = {f"d{i}": text(int(rng.integers(3, 12))) for i in range(10)}
  queries = {f"q{i}": text(2) for i in range(3)}
  run = {q: {d: float(rng.normal()) for d in rng.choice(list(collection), 4, replace=False)} for q in queries}
  formats.write_collection(tmp_path / "collection.tsv", collection)
  formats.write_queries(tmp_path / "queries.tsv", queries)
  formats.write_run(tmp_path / "run.trec", run)
  result = score.score(_config(tmp_path, teacher_dir), tmp_path, queries_path=str(tmp_path / "queries.tsv"),
                       collection_path=str(tmp_path / "collection.tsv"))
  model = transformers.T5ForConditionalGeneration.from_pretrained(teacher_dir).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  lines = [json.loads(line) for line in result.path.read_text().splitlines()]
  assert [line[0] for line in lines] == list(run)
  for qid, *entries in lines:
    q = queries[qid]
    expected = {d: _log_p_true(model, tokenizer, f"Query: {q} Document: {collection[d]} Relevant:") for d in run[qid]}
    assert [e[0] for e in entries] == sorted(expected, key=lambda d: -expected[d])
    np.testing.assert_allclose([e[1] for e in entries], [expected[e[0]] for e in entries], atol=1e-4)
    for i, entry in enumerate(entries):
      for j, logp in entry[2]:
        prompt = (f"Query: {q} Document0: {collection[entries[i][0]]} Document1: {collection[entries[j][0]]} "
                  f"Relevant:")
        assert logp == pytest.approx(_log_p_true(model, tokenizer, prompt), abs=1e-4)
  assert result.num_pairs == 2 * len(queries)


def test_teacher_benchmark_reports_passages_and_pairs_per_second(tmp_path, teacher_dir, capsys):
  config = _config(tmp_path, teacher_dir)
  config.benchmark.update(what="teacher", teacher_items=24, teacher_query_words=3, teacher_passage_words=20)
  records = modes.run(config, tmp_path)
  out = capsys.readouterr().out
  assert [r["variant"].split()[0] for r in records] == ["pointwise", "pairwise"]
  assert records[0]["passages_per_s"] > 0 and records[1]["pairs_per_s"] > 0
  assert all(r["items"] == 24 and r["devices"] == 8 for r in records)
  assert out.count("BENCHMARK ") == 2 and "items/s" in out
  assert len((tmp_path / "benchmark.jsonl").read_text().splitlines()) == 2


def test_t5_tokenizer_from_a_sentencepiece_model_alone(tmp_path):
  """castorini's monoT5 / duoT5 ship spiece.model without tokenizer.json: it loads, and encodes as SentencePiece."""
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(["Query: what is a cat Document: a cat purrs Relevant: true false",
                               "the dog barks at the water and the tree is big"] * 50))
  sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=40,
                                           model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                           hard_vocab_limit=False, minloglevel=2)
  directory = tmp_path / "teacher"
  directory.mkdir()
  (tmp_path / "spiece.model").rename(directory / "spiece.model")
  tokenizer = inputs.load_t5_tokenizer(directory)
  text = "Query: a cat Document: the dog barks Relevant:"
  reference = sentencepiece.SentencePieceProcessor(model_file=str(directory / "spiece.model"))
  assert tokenizer(text).input_ids == reference.encode(text) + [1]  # + </s>

"""The end-of-run report: when a run gives one, and its greedy sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax import end_of_run
from llama4_jax import model as model_lib

import small_run


class CharTokenizer:
  """Ids 3.. for characters; enough of the tokenizer interface for a sample."""

  bos_id, eos_id, pad_id = 1, 2, 0

  def encode(self, text):
    return [3 + ord(c) % 100 for c in text]

  def decode(self, ids, skip_special=False):
    return ''.join(chr(i) for i in ids if not (skip_special and i < 3))


@pytest.mark.slow
def test_greedy_sample_is_the_full_forward_argmax():
  """The KV-cache sample equals decoding with a full forward pass per token (the old way)."""
  cfg = model_lib.PRESETS['parity']
  model = model_lib.Llama4(cfg, rngs=nnx.Rngs(0))
  tok = CharTokenizer()
  sample = end_of_run.greedy_sample(model, tok, 12, prompt='ab')
  prompt = [tok.bos_id] + tok.encode('ab')
  tokens = np.zeros((1, len(prompt) + 12), np.int32)  # one shape: causal, the zeros are unseen
  tokens[0, : len(prompt)] = prompt
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
  end = tokens.shape[1]
  for position in range(len(prompt), tokens.shape[1]):
    tokens[0, position] = int(jnp.argmax(forward(state, tokens)[0, position - 1]))
    if tokens[0, position] in cfg.eos_token_ids:
      end = position + 1
      break
  assert sample == 'ab' + tok.decode(tokens[0, len(prompt) : end].tolist(), skip_special=True)


def test_only_small_one_process_runs_that_trained_report():
  config = small_run.config(train__sample_tokens=8)
  steps = config.train.steps
  assert end_of_run.wanted(config, 10**6, first_step=0, process_count=1)
  assert not end_of_run.wanted(config, 10**6, first_step=steps, process_count=1)  # resumed at end
  assert not end_of_run.wanted(config, 10**6, first_step=0, process_count=2)
  assert not end_of_run.wanted(config, 109 * 10**9, first_step=0, process_count=1)  # Scout
  config.train.sample_tokens = 0
  assert not end_of_run.wanted(config, 10**6, first_step=0, process_count=1)


class ByteTokenizer:
  """Ids 0-255 for the bytes of ASCII text."""

  vocab_size = 256

  def encode(self, text):
    return list(text.encode())

  def decode(self, ids, skip_special=False):
    return bytes(ids).decode()


def test_a_run_on_its_own_files_samples_from_its_own_text(tmp_path):
  """The sample's prompt is the start of the run's validation text, not Python's `def main(`."""
  plays = tmp_path / 'hamlet.txt'
  plays.write_text('\n  HAMLET. To be, or not to be, that is the question:\nWhether tis nobler\n')
  config = small_run.config(data__train_files=str(plays))
  tokenizer = ByteTokenizer()
  assert end_of_run.sample_prompt(config, tokenizer) == 'HAMLET. To be, or not to be, that is the'
  np.save(tmp_path / 'hamlet.npy', np.array(tokenizer.encode(plays.read_text()), np.int32))
  config = small_run.config(data__train_files=str(tmp_path / 'hamlet.npy'))
  assert end_of_run.sample_prompt(config, tokenizer).startswith('HAMLET. To be')  # token arrays
  config = small_run.config()
  assert end_of_run.sample_prompt(config, tokenizer) == end_of_run.SAMPLE_PROMPT


def test_image_text_questions_of_ones_own_get_no_shapes_accuracy(monkeypatch):
  """Only the built-in shapes questions have known answer choices to score."""
  from llama4_jax.data import image_text, shapes_data

  question = next(iter(shapes_data.QUESTIONS.values()))
  records = {
      'shapes': [image_text.Record('a.png', 'x', question, 'red')],
      'own': [image_text.Record('a.png', 'x', 'How many legs has the cat?', 'four')],
  }
  scored = []
  monkeypatch.setattr(image_text, 'row_maker', lambda *a: None)
  monkeypatch.setattr(image_text, 'shapes_accuracy', lambda *a: scored.append(a) or {'qa': 1})
  monkeypatch.setattr(end_of_run.evaluation, 'make_row_score_fn', lambda *a: None)
  for name, expected in [('own', {}), ('shapes', {'qa': 1})]:
    monkeypatch.setattr(image_text, 'split_records', lambda *a, name=name: records[name])
    assert end_of_run.shapes_accuracy(None, None, None, None, None, '') == expected
  assert len(scored) == 1

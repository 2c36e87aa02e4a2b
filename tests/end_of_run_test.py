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


def test_a_run_on_its_own_files_samples_from_its_own_text(tmp_path):
  """The sample's prompt is the start of the run's validation text, not Python's `def main(`."""
  plays = tmp_path / 'hamlet.txt'
  plays.write_text('\n  HAMLET. To be, or not to be, that is the question:\nWhether tis nobler\n')
  config = small_run.config(data__train_files=str(plays))
  assert end_of_run.sample_prompt(config) == 'HAMLET. To be, or not to be, that is the'
  config = small_run.config()
  assert end_of_run.sample_prompt(config) == end_of_run.SAMPLE_PROMPT

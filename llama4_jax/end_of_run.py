"""What a small run shows at its end: a greedy sample and the unigram baseline, or, for the
built-in shapes questions, the held-out answer accuracy next to the best text-only answer.

These need the whole model on one host and a pass over the data, so they are for small
single-process runs (the README's CPU jobs), not for Scout or Maverick.
"""

import ml_collections as mlc
from flax import nnx

from llama4_jax import evaluation, sampling
from llama4_jax.data import image_text
from llama4_jax.data import text as text_data

SAMPLE_PROMPT = 'def main('  # the built-in corpus is Python source
MAX_PARAMS = 2_000_000_000  # above this a run is not "small"


def wanted(config: mlc.ConfigDict, num_params: int, first_step: int, process_count: int) -> bool:
  """Whether the run should report them: a small one-process run that trained this time."""
  return (
      config.train.sample_tokens > 0
      and first_step < config.train.steps
      and process_count == 1
      and num_params <= MAX_PARAMS
  )


def report(config: mlc.ConfigDict, cfg, graphdef, params, tokenizer, workdir: str) -> dict:
  """{'sample', 'unigram_loss'} for text runs; the shapes accuracies for image-text runs."""
  if image_text.is_image_text(config):
    return shapes_accuracy(config, cfg, graphdef, params, tokenizer, workdir)
  model = nnx.merge(graphdef, params)
  return {
      'sample': greedy_sample(model, tokenizer, config.train.sample_tokens),
      'unigram_loss': text_data.unigram_loss(config.data, tokenizer, seq_len=config.data.seq_len),
  }


def greedy_sample(model, tokenizer, num_tokens: int, prompt: str = SAMPLE_PROMPT) -> str:
  """The prompt and its greedy continuation of at most `num_tokens` tokens (KV-cache decoding)."""
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  num_tokens = min(num_tokens, model.cfg.max_position_embeddings - len(ids))
  [new] = sampling.generate(
      model,
      [ids],
      max_new_tokens=num_tokens,
      eos_ids=model.cfg.eos_token_ids,
      pad_id=tokenizer.pad_id,
  )
  return prompt + tokenizer.decode(new, skip_special=True)


def shapes_accuracy(config: mlc.ConfigDict, cfg, graphdef, params, tokenizer, workdir: str):
  """Held-out question accuracy and the text-only best, when the data has questions."""
  held_out = image_text.split_records(config, 'validation', workdir)
  if not all(r.question and r.answer for r in held_out):
    return {}
  train = image_text.split_records(config, 'train', workdir)
  maker = image_text.row_maker(config, cfg, tokenizer)
  score_fn = evaluation.make_row_score_fn(graphdef, params)
  return image_text.shapes_accuracy(score_fn, maker, train, held_out)

"""Which data a run reads: text, image-text or chat (`data.modality`), for training and scoring."""

import ml_collections as mlc
import numpy as np

from llama4_jax.data import chat, image_text
from llama4_jax.data import text as text_data


def train_and_eval_data(
    config: mlc.ConfigDict,
    cfg,
    tokenizer,
    workdir: str,
    *,
    train_rows: text_data.BatchRows | None = None,
    eval_rows: text_data.BatchRows | None = None,
):
  """(training iterator, validation batches) of this process's rows of each global batch
  (default: all; `eval_rows.global_size` may exceed eval.batch_size: padding rows that fill the
  mesh's batch shards)."""
  module = _row_module(config)
  if module is not None:
    return (
        module.make_train_iterator(config, cfg, tokenizer, workdir=workdir, rows=train_rows),
        module.make_eval_batches(config, cfg, tokenizer, workdir=workdir, rows=eval_rows),
    )
  seq_len = config.data.seq_len
  train_iter = text_data.make_train_iterator(
      config.data,
      tokenizer,
      batch_size=config.train.batch_size,
      seq_len=seq_len,
      seed=config.seed,
      rows=train_rows,
  )
  eval_batches = text_data.make_eval_batches(
      config.data,
      tokenizer,
      batch_size=config.eval.batch_size,
      seq_len=seq_len,
      max_batches=config.eval.max_batches,
      rows=eval_rows,
  )
  return train_iter, eval_batches


def eval_batches(
    config: mlc.ConfigDict,
    cfg,
    tokenizer,
    *,
    files: str = '',
    batch_size: int,
    seq_len: int,
    max_batches: int = 0,
    workdir: str = '',
    rows: text_data.BatchRows | None = None,
) -> list[dict[str, np.ndarray]]:
  """Packed batches of `files` (text, JSONL, .npy globs), or of the run's validation data,
  of `batch_size` rows each, `rows` of them kept (see `train_and_eval_data`).

  An image-text or chat run's data (and `files`: JSON Lines of its records) are scored
  as its training scored them (image_text / chat.make_eval_batches).
  """
  config = mlc.ConfigDict(config.to_dict())
  if files:
    config.data.eval_files = files
  module = _row_module(config)
  if module is not None:
    config.data.seq_len, config.eval.batch_size = seq_len, batch_size
    config.eval.max_batches = max_batches
    return module.make_eval_batches(config, cfg, tokenizer, workdir=workdir, rows=rows)
  return text_data.make_eval_batches(
      config.data,
      tokenizer,
      batch_size=batch_size,
      seq_len=seq_len,
      max_batches=max_batches,
      rows=rows,
  )


def _row_module(config):
  """The data module of a run whose records are not plain text, or None."""
  return {'image_text': image_text, 'chat': chat}.get(config.data.get('modality', 'text'))

"""Which data a run reads: text or image-text (`data.modality`), for training and for scoring."""

import ml_collections as mlc
import numpy as np

from llama4_jax.data import image_text
from llama4_jax.data import text as text_data


def train_and_eval_data(
    config: mlc.ConfigDict,
    cfg,
    tokenizer,
    workdir: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    eval_batch_size: int | None = None,
):
  """(training iterator, validation batches) of this process's rows.

  eval_batch_size: rows per validation batch (default config.eval.batch_size); the trainer
  fills the mesh's batch shards with it.
  """
  where = dict(process_index=process_index, process_count=process_count)
  if eval_batch_size is not None:
    config = mlc.ConfigDict(config.to_dict())
    config.eval.batch_size = eval_batch_size
  if image_text.is_image_text(config):
    return (
        image_text.make_train_iterator(config, cfg, tokenizer, workdir=workdir, **where),
        image_text.make_eval_batches(config, cfg, tokenizer, workdir=workdir, **where),
    )
  seq_len = config.data.seq_len
  train_iter = text_data.make_train_iterator(
      config.data,
      tokenizer,
      batch_size=config.train.batch_size,
      seq_len=seq_len,
      seed=config.seed,
      **where,
  )
  eval_batches = text_data.make_eval_batches(
      config.data,
      tokenizer,
      batch_size=config.eval.batch_size,
      seq_len=seq_len,
      max_batches=config.eval.max_batches,
      **where,
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
) -> list[dict[str, np.ndarray]]:
  """Packed batches of `files` (text, JSONL, .npy globs), or of the run's validation data.

  An image-text run's data (and `files`, one JSON Lines file of image records)
  are scored as its training scored them (image_text.make_eval_batches).
  """
  config = mlc.ConfigDict(config.to_dict())
  if files:
    config.data.eval_files = files
  if image_text.is_image_text(config):
    config.data.seq_len, config.eval.batch_size = seq_len, batch_size
    config.eval.max_batches = max_batches
    return image_text.make_eval_batches(config, cfg, tokenizer, workdir=workdir)
  return text_data.make_eval_batches(
      config.data, tokenizer, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches
  )

"""Scores a checkpoint: mean next-token loss (nats), perplexity and token count.

  python scripts/eval.py --workdir=OUT --tokens=FILE.npy --seq_len=S --output=RESULT.json

--tokens is a 1-D array of token ids, cut into consecutive windows of S+1
tokens (remainder dropped); tokens 1..S of each window are predicted.
"""

import json

import numpy as np
from absl import flags

from llama4_jax import config_lib, evaluation, workdir as workdir_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training or converted workdir.', required=True)
_TOKENS = flags.DEFINE_string('tokens', None, '1-D .npy array of token ids.', required=True)
_SEQ_LEN = flags.DEFINE_integer('seq_len', None, 'Predicted tokens per window.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Windows per batch.')
_OUTPUT = flags.DEFINE_string('output', None, 'Write the result as JSON here.')


def main(argv):
  del argv
  model, _, step = workdir_lib.load_model(_WORKDIR.value, _STEP.value)
  tokens = np.load(_TOKENS.value, allow_pickle=False)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= model.cfg.vocab_size):
    raise ValueError(f'{_TOKENS.value}: token ids must lie in [0, {model.cfg.vocab_size}), '
                     f'found [{tokens.min()}, {tokens.max()}]')
  windows = evaluation.token_windows(tokens, _SEQ_LEN.value)
  result = evaluation.evaluate_batches(model, evaluation.windows_to_batches(windows, _BATCH.value))
  result['step'] = step
  print(json.dumps(result))
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  config_lib.run_main(main)

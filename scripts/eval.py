"""Scores checkpoints of a workdir: mean next-token loss (nats), perplexity, token count.

  python scripts/eval.py --workdir=OUT [--step=N | --all_steps] [--output=RESULT.json]
      [--files=GLOBS | --tokens=FILE.npy] [--seq_len=S] [--batch_size=B] [--max_batches=M]

Data: by default the run's validation data (config data.eval_files, or the
built-in validation split) with the run's tokenizer, `eval.max_batches`
batches as in training; --files: text, JSONL ("text" field) or .npy token
files, packed like training data; --tokens: a 1-D .npy array of token ids cut
into consecutive windows of S+1 tokens (remainder dropped).

Results are printed, written as JSON with --output, and logged to TensorBoard
(<workdir>/tensorboard: `eval/loss` and `eval/perplexity`, `eval_files/...` or
`eval_tokens/...` for other data) at each checkpoint's step. --all_steps
scores every saved checkpoint and writes eval_steps.md, eval_steps.csv and
eval_steps.png (loss versus step) to the workdir, or next to --output.
"""

import functools
import json
import os

from absl import flags

from llama4_jax import cli, evaluation

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training or converted workdir.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).', lower_bound=0)
_ALL_STEPS = flags.DEFINE_bool('all_steps', False, 'Score every saved checkpoint.')
_FILES = flags.DEFINE_string('files', '', 'Comma-separated globs of text, .jsonl or .npy files.')
_TOKENS = flags.DEFINE_string('tokens', '', '1-D .npy array of token ids, cut into windows.')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', '', "tokenizer.json or SentencePiece .model (default: the run's)."
)
_SEQ_LEN = flags.DEFINE_integer(
    'seq_len', None, "Predicted tokens per row (default: the run's).", lower_bound=1
)
_BATCH = flags.DEFINE_integer(
    'batch_size', None, "Rows per batch (default: the run's eval.batch_size).", lower_bound=1
)
_MAX_BATCHES = flags.DEFINE_integer(
    'max_batches',
    None,
    "Batches to score, 0 = all (default: the run's eval.max_batches on its "
    'validation data, else all).',
    lower_bound=0,
)
_TAG = flags.DEFINE_string(
    'tag', '', 'TensorBoard tag prefix (default: eval, or eval_files / eval_tokens).'
)
_OUTPUT = flags.DEFINE_string('output', None, 'Write the result as JSON here.')


def main(argv):
  del argv
  output = _OUTPUT.value
  rows = evaluation.evaluate_workdir(
      _WORKDIR.value,
      step=_STEP.value,
      all_steps=_ALL_STEPS.value,
      tag=_TAG.value,
      table_dir=os.path.dirname(os.path.abspath(output)) if output else None,
      log=functools.partial(print, flush=True),
      files=_FILES.value,
      tokens=_TOKENS.value,
      tokenizer=_TOKENIZER.value,
      seq_len=_SEQ_LEN.value,
      batch_size=_BATCH.value,
      max_batches=_MAX_BATCHES.value,
  )
  result = dict(rows[-1], all_steps=rows) if _ALL_STEPS.value else rows[-1]
  if output:
    with open(output, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  cli.run_main(main, repeats_steps=True)

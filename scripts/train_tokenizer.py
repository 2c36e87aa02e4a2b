r"""Trains a SentencePiece BPE tokenizer with the Llama 4 special tokens.

  python scripts/train_tokenizer.py --output=/tmp/tok.model --vocab_size=4096
  python scripts/train_tokenizer.py --output=tok.model \
      --files='data/*.txt,data/more.jsonl' --max_bytes=20000000

An empty --files trains on the built-in corpus (the stdlib's train split).
"""

from absl import flags

from llama4_jax import cli
from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib

_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the .model.', required=True)
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 4096, 'Vocabulary size.', lower_bound=16)
_FILES = flags.DEFINE_string(
    'files', '', 'Comma-separated globs of text / .jsonl files; empty = the ' 'built-in corpus.'
)
_MAX_BYTES = flags.DEFINE_integer(
    'max_bytes',
    tokenizer_lib.DEFAULT_TRAIN_BYTES,
    'Train on at most this much text (0 = all).',
    lower_bound=0,
)


def main(argv):
  del argv  # Unused.
  texts = text_data.read_texts(_FILES.value, _MAX_BYTES.value)
  tok = tokenizer_lib.train_tokenizer(texts, _VOCAB_SIZE.value, _OUTPUT.value)
  print(
      f'Wrote {_OUTPUT.value}: {tok.vocab_size} ids, trained on '
      f'{sum(len(t.encode()) for t in texts)} bytes in {len(texts)} texts.'
  )


if __name__ == '__main__':
  cli.run_main(main)

"""A `tokenizer.json` with the structure of Meta's released Llama 4 one (test-only).

The real file cannot be downloaded here. This one is built with the `tokenizers` library
the way the released file is laid out (docs/llama4_architecture.md §7): byte-level BPE
behind the o200k-style split regex, 200,000 ordinary ids (a few hundred learned merges,
the rest unreachable fillers), then the special tokens at their released ids from 200000,
2,048 of them, for a vocabulary of 202,048; a post-processor that prepends
`<|begin_of_text|>`; and the side files a checkpoint ships (`tokenizer_config.json` with
the released chat template, `special_tokens_map.json`).
"""

import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers.models.llama4 import processing_llama4

# META tokenizer.py's O200K_PATTERN: the pre-tokenizer's split regex.
O200K_PATTERN = (
    r'[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+'
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r'|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*'
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r'|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+'
)
NUM_ORDINARY = 200_000
VOCAB_SIZE = 202_048
BOS, EOS, EOT, PAD = 200_000, 200_001, 200_008, 200_018
IMAGE, PATCH = 200_090, 200_092
TRAINING_TEXT = [
    'The quick brown fox jumps over the lazy dog. ' * 3,
    "It's 12:30; we'll see 2024-07-26 and 1,234,567 items.\n\nNew paragraph\r\n",
    'def f(x):\n    return x + 1  # add one\n\tTabs too.',
    'Unicode: wörld, naïve café, 漢字, emoji 😀, Ωmega.',
    'user assistant system What is 12 + 30? The answer is 42.',
]


def special_tokens() -> list[str]:
  """The 2,048 special token strings, in id order from 200000 (META tokenizer.py)."""
  names = [
      '<|begin_of_text|>',
      '<|end_of_text|>',
      '<|fim_prefix|>',
      '<|fim_middle|>',
      '<|fim_suffix|>',
      '<|header_start|>',
      '<|header_end|>',
      '<|eom|>',
      '<|eot|>',
      '<|step|>',
  ]
  names += [f'<|text_post_train_reserved_special_token_{i}|>' for i in range(6)]
  names += ['<|python_start|>', '<|python_end|>', '<|finetune_right_pad|>']
  names += [f'<|text_post_train_reserved_special_token_{i}|>' for i in range(6, 67)]
  vision = ['<|image_start|>', '<|image_end|>'] + [None] * 2
  vision += ['<|tile_x_separator|>', '<|tile_y_separator|>'] + [None] * 4
  vision += ['<|image|>', None, '<|patch|>'] + [None] * 1041
  reserved = iter(range(1048))
  names += [n or f'<|vision_reserved_special_token_{next(reserved)}|>' for n in vision]
  names += [
      f'<|reserved_special_token_{i}|>' for i in range(VOCAB_SIZE - NUM_ORDINARY - len(names))
  ]
  assert len(names) == VOCAB_SIZE - NUM_ORDINARY
  return names


def build() -> tokenizers.Tokenizer:
  pre_tokenizer = pre_tokenizers.Sequence(
      [
          pre_tokenizers.Split(tokenizers.Regex(O200K_PATTERN), behavior='isolated'),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
  )
  learner = tokenizers.Tokenizer(models.BPE())
  learner.pre_tokenizer = pre_tokenizer
  learner.train_from_iterator(
      TRAINING_TEXT,
      trainers.BpeTrainer(
          vocab_size=600,
          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
          show_progress=False,
      ),
  )
  learned = json.loads(learner.to_str())['model']
  vocab = dict(learned['vocab'])
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in learned['merges']]
  for i in range(len(vocab), NUM_ORDINARY):  # ids no merge reaches, as rare ranks would be
    vocab[f'<unused_{i}>'] = i
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(special_tokens())
  tok.post_processor = processors.TemplateProcessing(
      single='<|begin_of_text|> $A',
      pair='<|begin_of_text|> $A $B',
      special_tokens=[('<|begin_of_text|>', BOS)],
  )
  return tok


def write(folder) -> str:
  """Writes tokenizer.json and its side files into `folder`; returns tokenizer.json's path."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'tokenizer.json')
  build().save(path)
  side = {
      'tokenizer_config.json': {
          'bos_token': '<|begin_of_text|>',
          'eos_token': '<|eot|>',
          'pad_token': '<|finetune_right_pad|>',
          'chat_template': processing_llama4.chat_template,
          'tokenizer_class': 'PreTrainedTokenizerFast',
      },
      'special_tokens_map.json': {
          'bos_token': '<|begin_of_text|>',
          'eos_token': '<|eot|>',
          'pad_token': '<|finetune_right_pad|>',
      },
  }
  for name, content in side.items():
    with open(os.path.join(folder, name), 'w') as f:
      json.dump(content, f, indent=2)
  return path

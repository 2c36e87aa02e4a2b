"""Samples from a checkpoint with a KV cache.

  python scripts/generate.py --workdir=DIR --prompt="def main(" [--prompt=...] \\
      [--max_new_tokens=64 --temperature=0 --top_k=0 --top_p=1 --seed=0 --output=ids.json]
  python scripts/generate.py --workdir=CONVERTED --prompt_ids=1,2,3 --prompt_ids=1,5
  python scripts/generate.py --workdir=MULTIMODAL --image=cat.png --prompt="<|image|>What is this?"
  python scripts/generate.py --workdir=FINE_TUNED --chat --prompt="How old is omar?"

--prompt is tokenized with the run's tokenizer (or --tokenizer); with --chat each
is a user turn in the Llama 4 chat format, answered until `<|eot|>`. --prompt_ids
gives ids directly (with --chat, the run still needs a tokenizer, for `<|eot|>`).
Prompts of different lengths form one left-padded batch. --output writes
{"ids": [[...], ...]}: the generated ids per prompt, without the prompt, ending at
the first EOS. --image (repeatable; multimodal models) fills the prompts'
`<|image|>` markers in order (with --chat, each marker is an image inside the
user turn); a single prompt without markers gets its images at the start (of its
user turn, with --chat). Each image is tiled, encoded once in the prefill, and
decoding goes on from the KV cache.
"""

import json

from absl import flags

from llama4_jax import cli, sampling
from llama4_jax import workdir as workdir_lib
from llama4_jax.data import image_processing, image_text
from llama4_jax.data import tokenizer as tokenizer_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training or converted workdir.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).', lower_bound=0)
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'Prompt text (repeatable).')
_CHAT = flags.DEFINE_bool(
    'chat', False, 'Each --prompt is a user turn of a chat (Llama 4 format), answered to <|eot|>.'
)
_PROMPT_IDS = flags.DEFINE_multi_string(
    'prompt_ids', [], 'Comma-separated prompt ids (repeatable).'
)
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', None, "tokenizer.json or SentencePiece .model (default: the run's)."
)
_MAX_NEW = flags.DEFINE_integer(
    'max_new_tokens', 64, 'Tokens to generate per prompt.', lower_bound=1
)
_TEMPERATURE = flags.DEFINE_float(
    'temperature', 0.0, 'Sampling temperature; 0 = greedy.', lower_bound=0.0
)
_TOP_K = flags.DEFINE_integer(
    'top_k', 0, 'Sample among the k most likely tokens (0 = all).', lower_bound=0
)
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1 = off).', upper_bound=1.0)
flags.register_validator('top_p', lambda p: p > 0, message='--top_p must be in (0, 1]')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.', lower_bound=0)
_OUTPUT = flags.DEFINE_string('output', None, 'Write {"ids": [[...], ...]} here.')
_IMAGE = flags.DEFINE_multi_string(
    'image', [], 'Image file (PNG, JPEG, ...) for the prompts ' '(repeatable).'
)


def parse_ids(text: str, vocab_size: int) -> list[int]:
  try:
    ids = [int(t) for t in text.split(',') if t.strip()]
  except ValueError as e:
    raise ValueError(f'--prompt_ids={text!r}: expected comma-separated integers') from e
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad or not ids:
    raise ValueError(
        f'--prompt_ids={text!r}: ids must be in [0, {vocab_size}), got {bad or "none"}'
    )
  return ids


def main(argv):
  del argv
  if not _PROMPT.value and not _PROMPT_IDS.value:
    raise ValueError('give at least one --prompt or --prompt_ids')
  model, config, step = workdir_lib.load_model(_WORKDIR.value, _STEP.value)
  cfg = model.cfg
  try:
    tokenizer = tokenizer_lib.run_tokenizer(_WORKDIR.value, config, _TOKENIZER.value or '')
  except FileNotFoundError as e:
    if _PROMPT.value or _TOKENIZER.value:
      raise
    if _CHAT.value:
      raise ValueError(f'--chat answers until <|eot|>, which needs a tokenizer: {e}') from None
    tokenizer = None  # --prompt_ids only: ids in, ids out
  if _CHAT.value:
    # The images of a single prompt (as place_images has it) go first in its user turn.
    single = len(_PROMPT.value) == 1 and not _PROMPT_IDS.value
    prompts = image_text.chat_prompts(tokenizer, _PROMPT.value, len(_IMAGE.value) * single)
  else:
    prompts = [[cfg.bos_token_id] + tokenizer.encode(text) for text in _PROMPT.value]
  prompts += [parse_ids(text, cfg.vocab_size) for text in _PROMPT_IDS.value]
  pixels = None
  if _IMAGE.value:
    if cfg.vision is None:
      raise ValueError(f'--image: the model in {_WORKDIR.value} has no vision tower')
    images = [image_processing.load_image(path) for path in _IMAGE.value]
    prompts, pixels = image_text.place_images(
        prompts, images, cfg.vision, image_processing.image_token_ids_for(cfg.vision, tokenizer)
    )
  ids = sampling.generate(
      model,
      prompts,
      max_new_tokens=_MAX_NEW.value,
      eos_ids=[*cfg.eos_token_ids, tokenizer.eot_id] if _CHAT.value else cfg.eos_token_ids,
      pad_id=cfg.pad_token_id,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
      seed=_SEED.value,
      pixels_BMCHW=pixels,
  )
  for prompt, out in zip(prompts, ids):
    if tokenizer is not None:
      print(repr(tokenizer.decode(prompt[1:] + out, skip_special=True)))
    else:
      print(prompt, '->', out)
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump({'ids': ids, 'step': step}, f)


if __name__ == '__main__':
  cli.run_main(main, repeats_steps=True)

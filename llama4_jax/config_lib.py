"""The run config (an ml_collections ConfigDict): its keys and defaults, checks, save and load.

`base_config` defines every key the code reads, with a comment each; experiment
files in configs/ start from it and change what differs. Config files are
Python and run as code; a workdir's `config.json` is data.
"""

import dataclasses
import difflib
import json
import math

import ml_collections as mlc
from etils import epath

from llama4_jax import checkpoint, optim, sharding
from llama4_jax import model as model_lib

CONFIG_FILE = 'config.json'
MODALITIES = ('text', 'image_text', 'chat')  # data.modality


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def model_config(config: mlc.ConfigDict) -> model_lib.ModelConfig:
  try:
    return model_lib.ModelConfig.from_dict(config.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from e


_POSITIVE = (lambda v: v > 0, 'positive')
_AT_LEAST_0 = (lambda v: v >= 0, '>= 0')
_FRACTION = (lambda v: 0 <= v <= 1, 'in [0, 1]')
_DECAY_RATE = (lambda v: 0 <= v < 1, 'in [0, 1)')

# Every numeric key of base_config() and the range where it means something.
NUMERIC_RANGES = {
    'seed': _AT_LEAST_0,
    'data.builtin_max_bytes': _POSITIVE,
    'data.packing_bins': _AT_LEAST_0,
    'data.tokenizer_train_bytes': _AT_LEAST_0,
    'data.tiles_per_row': _AT_LEAST_0,
    'data.shapes.train_examples': _POSITIVE,
    'data.shapes.eval_examples': _POSITIVE,
    'data.shapes.seed': _AT_LEAST_0,
    'data.chat_task.train_examples': _POSITIVE,
    'data.chat_task.eval_examples': _POSITIVE,
    'data.chat_task.seed': _AT_LEAST_0,
    'train.steps': _POSITIVE,
    'train.batch_size': _POSITIVE,
    'train.grad_accum_steps': _POSITIVE,
    'train.checkpoint_every': _POSITIVE,
    'train.keep_checkpoints': _POSITIVE,  # 0 would delete the newest checkpoint too
    'train.eval_every': _AT_LEAST_0,
    'train.log_every': _POSITIVE,
    'train.load_balance_coef': _AT_LEAST_0,
    'train.router_z_coef': _AT_LEAST_0,
    'train.sample_tokens': _AT_LEAST_0,
    'optim.lr': _AT_LEAST_0,  # 0: the weights stay as they are (a frozen fine-tune, a test)
    'optim.warmup_steps': _AT_LEAST_0,
    'optim.min_lr_ratio': _FRACTION,
    'optim.b1': _DECAY_RATE,
    'optim.b2': _DECAY_RATE,
    'optim.eps': _POSITIVE,
    'optim.weight_decay': _AT_LEAST_0,
    'optim.clip_norm': _AT_LEAST_0,
    'eval.batch_size': _POSITIVE,
    'eval.max_batches': _AT_LEAST_0,
}


def validate(config: mlc.ConfigDict, num_devices: int | None = None) -> model_lib.ModelConfig:
  """Checks the values the code relies on before anything compiles; returns the ModelConfig.

  With `num_devices`, also the mesh, and the training batch against its batch shards. (Any
  number of processes feeds them: each the rows its devices hold, sharding.process_batch_rows;
  evaluation pads its batch with rows of weight 0 to fill the shards.)
  """
  cfg = model_config(config)

  def fail(key, msg):
    raise ConfigError(f'config.{key}: {msg}')

  for key in config.mesh:
    if key not in sharding.MESH_AXES:
      fail(f'mesh.{key}', f'unknown mesh axis; axes are {sharding.MESH_AXES}')
  shards = 1
  if num_devices is not None:
    try:
      sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(dict(config.mesh), num_devices)))
    except ValueError as e:
      fail('mesh', str(e).removeprefix('mesh: '))
    shards = math.prod(sizes[a] for a in sharding.BATCH_AXES)
  for key, (in_range, meaning) in NUMERIC_RANGES.items():
    node = _value(config, key, None)
    if node is not None and not in_range(node):
      fail(key, f'must be {meaning}, got {node}')
  if 'train' in config:
    t = config.train
    if t.batch_size % t.grad_accum_steps:
      fail(
          'train.grad_accum_steps',
          f'{t.grad_accum_steps} does not divide train.batch_size={t.batch_size}',
      )
    if t.get('freeze', '') not in optim.FREEZE_OPTIONS:
      fail('train.freeze', f'{t.freeze!r} is not one of {optim.FREEZE_OPTIONS}')
    chunk = t.get('loss_chunk', 0)
    seq_len = config.data.seq_len if 'data' in config else chunk
    if chunk < 0 or 0 < chunk < seq_len and seq_len % chunk:  # chunk >= seq_len: whole rows
      fail('train.loss_chunk', f'{chunk} must be 0, divide data.seq_len={seq_len} or exceed it')
    if t.get('freeze') and cfg.vision is None:
      fail('train.freeze', f'{t.freeze!r} needs a model with a vision tower (model.vision)')
  if 'data' in config:
    if config.data.seq_len <= 0:
      fail('data.seq_len', f'must be positive, got {config.data.seq_len}')
    if config.data.seq_len > cfg.max_position_embeddings:
      fail(
          'data.seq_len',
          f'{config.data.seq_len} exceeds model.max_position_embeddings='
          f'{cfg.max_position_embeddings}',
      )
    modality = config.data.get('modality', 'text')
    if modality not in MODALITIES:
      fail('data.modality', f'{modality!r} is not one of {MODALITIES}')
    overlong = config.data.get('chat_overlong', 'truncate')
    if overlong not in ('truncate', 'error'):
      fail('data.chat_overlong', f'{overlong!r} is not "truncate" or "error"')
    if modality == 'image_text' and cfg.vision is None:
      fail('data.modality', '"image_text" needs a model with a vision tower (model.vision)')
  if 'train' in config:
    rows = config.train.batch_size // config.train.grad_accum_steps  # per micro-batch
    if rows % shards:
      fail(
          'train.batch_size',
          f'{config.train.batch_size} sequences ({rows} per micro-batch) cannot be split over '
          f'the {shards} batch shards of the mesh',
      )
  return cfg


def _accepts(old, value) -> bool:
  """Whether `value` may replace `old`, by the rules of a `--config.key=value` flag."""
  if isinstance(old, bool) or isinstance(value, bool):  # bool is an int in Python; not here
    return isinstance(old, bool) and isinstance(value, bool)
  if isinstance(old, float):
    return isinstance(value, (int, float))
  if isinstance(old, (tuple, list)):
    return isinstance(value, (tuple, list))
  return old is None or isinstance(value, type(old))


def _value(config: mlc.ConfigDict, dotted: str, default):
  """The value of `dotted`, or `default` where a part of it is missing."""
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'get') or part not in node:
      return default
    node = node[part]
  return node


def _parent(config: mlc.ConfigDict, key: str) -> mlc.ConfigDict:
  """The section that holds dotted `key`; a ConfigError names the first missing part."""
  parts = key.split('.')
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, mlc.ConfigDict) or part not in node:
      known = list(node) if isinstance(node, mlc.ConfigDict) else []
      close = difflib.get_close_matches(part, known)
      hint = f'; did you mean {".".join(parts[:depth] + close[:1])}?' if close else ''
      raise ConfigError(f'config.{key}: no such key{hint}')
    parent, node = node, node[part]
  return parent


def set_override(config: mlc.ConfigDict, key: str, value):
  """Sets dotted `key` of `config` to `value`, checked as a `--config.key=value` flag is.

  An unknown key, a section, or a value of another type is a ConfigError naming
  the key (ConfigDict alone would let a bool into an int field, or None anywhere).
  """
  parent, leaf = _parent(config, key), key.split('.')[-1]
  old = parent[leaf]
  if isinstance(old, mlc.ConfigDict):
    raise ConfigError(f'config.{key}: is a section; override its keys one by one')
  if not _accepts(old, value):
    raise ConfigError(
        f'config.{key}: expects {type(old).__name__} (like {old!r}), got '
        f'{type(value).__name__} {value!r}'
    )
  if isinstance(old, float):
    value = float(value)
  elif isinstance(old, (tuple, list)):
    value = type(old)(value)
  with parent.ignore_type():  # checked above, by the flag's rules
    parent[leaf] = value


def save(config: mlc.ConfigDict, workdir: str):
  """Writes the resolved config to <workdir>/config.json (atomically)."""
  path = epath.Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (CONFIG_FILE + '.tmp')
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  tmp.replace(path)  # epath: a rename on local disks, a copy-then-delete on GCS


def load(workdir: str) -> mlc.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f'{path}: missing; is {workdir} a llama4_jax workdir '
        f'(from train.py or convert_checkpoint.py)?'
    )
  try:
    return mlc.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path}: not valid JSON ({e})') from e


def resumes(workdir: str) -> bool:
  """Whether a run in `workdir` resumes: it holds the run's saved config and a checkpoint
  (the trainer then restores that checkpoint, or stops; workdir.check_resumable compares the
  configs)."""
  return bool(workdir) and (
      (epath.Path(workdir) / CONFIG_FILE).exists() and checkpoint.latest_step(workdir) is not None
  )


def with_init_model(config: mlc.ConfigDict, workdir: str = '') -> mlc.ConfigDict:
  """`config` with the model of its `train.init_from` workdir, if `train.model_from_init`.

  The architecture is the saved model's; how it is computed (model.EXECUTION_FIELDS) and the
  dtype its weights train in (`param_dtype`: a converted checkpoint stores bf16, a fine-tune
  may keep float32 master weights) stay the config's. So one fine-tuning config serves any
  converted or trained model.

  A run that resumes in `workdir` (`resumes`) takes the model from its own saved config
  instead: its checkpoint, not init_from's, holds the weights it goes on from, so init_from
  may be gone by then. A fresh start reads init_from (an error naming it if it is missing).
  """
  train = config.get('train', {})
  if not (train.get('model_from_init') and train.get('init_from')):
    return config
  source = workdir if resumes(workdir) else train.init_from
  saved = load(source).model.to_dict()
  keep = (*model_lib.EXECUTION_FIELDS, 'param_dtype')
  config = mlc.ConfigDict(config.to_dict())
  with config.unlocked():
    config.model = mlc.ConfigDict(saved | {k: config.model[k] for k in keep if k in config.model})
  return config


def diff_model(a: mlc.ConfigDict, b: mlc.ConfigDict) -> list[str]:
  """Names of model fields whose values differ, missing fields taking their defaults (a config
  saved before a field existed) and fields of model.EXECUTION_FIELDS left out."""
  model_a, model_b = (model_config(c).to_dict() for c in (a, b))
  return [
      k for k in sorted(model_a) if k not in model_lib.EXECUTION_FIELDS and model_a[k] != model_b[k]
  ]


def _as_is(value):
  return value


# What a resumed run must keep (`diff_resume`): the data stream that its checkpoint's iterator
# state is a position in, and the structure of its optimizer state. Steps, learning rates,
# logging, evaluation and where files go may change. Each key maps to what is compared.
RESUME_KEYS = {
    'seed': _as_is,
    'train.batch_size': _as_is,
    'train.freeze': _as_is,
    'optim.clip_norm': bool,  # clipping on or off (another optimizer state); its threshold may change
    'data.modality': _as_is,
    'data.train_files': _as_is,
    'data.tokenizer_train_bytes': _as_is,  # with train_files: the tokenizer a run trains
    'data.seq_len': _as_is,
    'data.packing_bins': _as_is,
    'data.builtin_max_bytes': _as_is,
    'data.tiles_per_row': _as_is,
    'data.chat_overlong': _as_is,
    'data.chat_task.seed': _as_is,
    'data.chat_task.train_examples': _as_is,
    'data.shapes.seed': _as_is,
    'data.shapes.train_examples': _as_is,
}


def diff_resume(config: mlc.ConfigDict, saved: mlc.ConfigDict) -> list[tuple[str, object, object]]:
  """(key, saved value, new value) of each RESUME_KEYS key that differs; keys a config lacks
  (saved before the key existed) take base_config's defaults."""
  defaults = base_config()
  changed = []
  for key, compared in RESUME_KEYS.items():
    default = _value(defaults, key, None)
    before, after = _value(saved, key, default), _value(config, key, default)
    if compared(before) != compared(after):
      changed.append((key, before, after))
  return changed


# The keys and their defaults ----------------------------------------------------------


def base_config() -> mlc.ConfigDict:
  """Every key the code reads, with its default and meaning; experiment configs start here."""
  config = mlc.ConfigDict()
  config.seed = 0  # parameter init, data order and sampling all derive from it

  # Architecture: a preset of llama4_jax.model.PRESETS expanded field by field.
  config.model = model_preset('tiny')

  # Device mesh: axis sizes; one may be -1 to take the remaining devices.
  config.mesh = mlc.ConfigDict(
      dict(
          data=1,  # pure data parallelism (weights replicated)
          fsdp=-1,  # data parallelism with weights sharded along `embed`
          tensor=1,  # heads / MLP width / vocabulary
          expert=1,  # experts of MoE layers (tokens also split over it)
      )
  )

  config.data = mlc.ConfigDict(
      dict(
          # 'text'; 'image_text' (needs model.vision; data/image_text.py); 'chat' (data/chat.py)
          modality='text',
          train_files='',  # comma-separated globs (.txt, .jsonl with "text", .npy ids); '' = built-in corpus
          eval_files='',  # same forms; '' = the built-in corpus' validation split
          # tokenizer.json or SentencePiece .model; '' = the workdir's, the init_from run's, or
          # one trained on train_files (or the built-in corpus): data/tokenizer.py
          tokenizer='',
          tokenizer_cache='',  # where a trained tokenizer is kept; '' = <workdir>/tokenizer
          builtin_max_bytes=8_000_000,  # cap on built-in corpus text (bytes)
          seq_len=256,  # tokens per training sequence
          packing_bins=0,  # rows packed together per first-fit group (0 = max(4 x batch, 64))
          tokenizer_train_bytes=0,  # text used to train the built-in tokenizer (0 = 4 MB)
          tiles_per_row=0,  # image_text: image tiles per row (0 = model.vision.max_tiles + 1)
          images_anywhere=False,  # image_text, chat: image paths may leave the data file's folder
          # chat: a conversation longer than seq_len + 1 tokens is 'truncate'd or an 'error'
          chat_overlong='truncate',
          # chat with train_files/eval_files '': the built-in table questions (data/chat_task.py).
          chat_task=mlc.ConfigDict(
              dict(
                  dir='',  # where they are written ('' = <workdir>/chat_task)
                  train_examples=20000,
                  eval_examples=200,
                  seed=0,
              )
          ),
          # image_text with train_files/eval_files '': the built-in shapes questions
          # (llama4_jax/data/shapes_data.py).
          shapes=mlc.ConfigDict(
              dict(
                  # where they are written ('' = <workdir>/shapes_data; for a gs:// workdir,
                  # ~/.cache/llama4_jax/shapes_data: PIL reads local files)
                  dir='',
                  train_examples=20000,
                  eval_examples=600,
                  seed=0,
              )
          ),
      )
  )

  config.train = mlc.ConfigDict(
      dict(
          steps=1000,  # optimizer updates
          batch_size=32,  # global batch, in sequences
          grad_accum_steps=1,  # micro-batches per update (batch_size must divide)
          checkpoint_every=200,  # steps between checkpoints (and one at the end)
          keep_checkpoints=3,  # newest checkpoints kept
          eval_every=200,  # steps between validation evals (0 = only at the end)
          log_every=10,  # steps between metric logs
          init_from='',  # workdir/checkpoint of a converted model to fine-tune from
          model_from_init=False,  # take model.* from init_from's config (but how it computes)
          load_balance_coef=0.0,  # MoE load-balancing loss weight (0 = exact HF model)
          router_z_coef=0.0,  # MoE router z-loss weight
          skip_nonfinite=False,  # on a non-finite loss/grad: False = stop, True = skip the update
          sample_tokens=48,  # length of the sample printed at the end (0 = none)
          freeze='',  # '', 'vision' (the vision tower) or 'language' (all but vision + projector)
          loss_chunk=0,  # positions whose logits the loss takes at once (0 = all; divides seq_len)
      )
  )

  config.optim = mlc.ConfigDict(
      dict(
          lr=3e-3,  # peak learning rate
          warmup_steps=100,  # linear warmup from 0
          min_lr_ratio=0.1,  # cosine decay ends at lr * min_lr_ratio at train.steps
          b1=0.9,
          b2=0.95,
          eps=1e-8,
          weight_decay=0.1,  # decoupled (AdamW)
          decay_norms=False,  # apply weight decay to norm scales
          decay_embeddings=False,  # apply weight decay to the token embedding
          clip_norm=1.0,  # global gradient norm clip (0 = off)
      )
  )

  config.eval = mlc.ConfigDict(
      dict(
          batch_size=16,  # sequences per eval batch
          max_batches=20,  # eval batches per validation (0 = whole split)
      )
  )
  return config


def model_preset(name: str, **overrides) -> mlc.ConfigDict:
  """A ModelConfig preset expanded into a ConfigDict, so every field is overridable."""
  if name not in model_lib.PRESETS:
    raise ValueError(f'unknown model preset {name!r}; presets are {sorted(model_lib.PRESETS)}')
  fields = dataclasses.asdict(model_lib.PRESETS[name].replace(**overrides))
  return mlc.ConfigDict(fields)


def parse_arg(arg: str | None, **spec) -> mlc.ConfigDict:
  """Parses 'a=1,b,c=x' against typed defaults: `parse_arg(arg, runlocal=False, lr=1e-3)`.

  A bare name sets a boolean to True; unknown names are an error.
  """
  out = mlc.ConfigDict(spec)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in spec:
      raise ValueError(f'config arg {key!r} is unknown; known: {sorted(spec)}')
    default = spec[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ('', '1', 'true', 'yes')
    else:
      out[key] = type(default)(value)
  return out

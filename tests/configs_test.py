"""Config files, command-line overrides and validation."""

import glob
import os
import shutil

import ml_collections as mlc
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from llama4_jax import checkpoint, config_lib, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
CONFIG_FILES = [f for f in CONFIG_FILES if os.path.basename(f) not in ('__init__.py', 'common.py')]


def parse(*args):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', flag_values=values, lock_config=True, sys_argv=['prog', *args]
  )
  values(['prog', *args])
  return values.config


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads_and_validates(path):
  config = parse(f'--config={path}')
  cfg = config_lib.validate(config, num_devices=8 if 'maverick' not in path else 64)
  assert cfg.num_layers >= 4
  module_doc = open(path).read().split('"""')[1]
  assert 'python scripts/train.py' in module_doc or 'base' in os.path.basename(path)


def test_overrides_reach_every_section():
  config = parse(
      f'--config={REPO}/configs/tiny.py',
      '--config.train.steps=7',
      '--config.model.num_experts=8',
      '--config.mesh.fsdp=2',
      '--config.optim.lr=0.5',
      '--config.model.moe_layers=(1,)',
  )
  assert (config.train.steps, config.model.num_experts, config.mesh.fsdp) == (7, 8, 2)
  assert config_lib.validate(config).moe_layers == (1,)


def test_unknown_key_is_an_error_naming_it():
  with pytest.raises(Exception, match='stepz'):
    parse(f'--config={REPO}/configs/tiny.py', '--config.train.stepz=7')


def test_wrong_type_is_an_error_naming_the_key():
  with pytest.raises(Exception, match='steps'):
    parse(f'--config={REPO}/configs/tiny.py', '--config.train.steps=many')


@pytest.mark.parametrize(
    'override,key',
    [
        ('--config.model.num_kv_heads=3', 'num_kv_heads'),
        ('--config.data.seq_len=100000', 'data.seq_len'),
        ('--config.train.grad_accum_steps=5', 'grad_accum_steps'),
        ('--config.mesh.tensor=3', 'mesh'),
        ('--config.model.rope_type=yarn', 'rope_type'),
        ('--config.train.loss_chunk=100', 'train.loss_chunk'),
        ('--config.train.keep_checkpoints=0', 'train.keep_checkpoints: must be positive, got 0'),
        ('--config.optim.b2=1.0', r'optim.b2: must be in \[0, 1\), got 1.0'),
        ('--config.optim.lr=-0.001', 'optim.lr: must be >= 0'),
        ('--config.optim.min_lr_ratio=2.0', 'optim.min_lr_ratio'),
        ('--config.train.eval_every=-1', 'train.eval_every: must be >= 0'),
        ('--config.eval.batch_size=0', 'eval.batch_size'),
        ('--config.data.shapes.eval_examples=0', 'data.shapes.eval_examples'),
        ('--config.data.modality=chats', "data.modality: 'chats' is not one of"),
        ('--config.data.chat_overlong=drop', 'data.chat_overlong'),
        ('--config.data.chat_task.train_examples=0', 'data.chat_task.train_examples'),
        ('--config.seed=-3', 'seed: must be >= 0'),
        ('--config.model.attention_query_block=-1', 'attention_query_block'),
        ('--config.model.attention_key_block=8', 'attention_key_block: key blocks split query'),
        ('--config.model.floor_scale=0', 'floor_scale: must be positive'),
        ('--config.train.batch_size=12', 'train.batch_size: 12 sequences .* the 8 batch shards'),
    ],
)
def test_validation_names_the_key(override, key):
  config = parse(f'--config={REPO}/configs/tiny.py', override)
  with pytest.raises(config_lib.ConfigError, match=key):
    config_lib.validate(config, num_devices=8)


def test_a_resume_may_change_the_schedule_but_not_the_data_stream():
  saved = parse(f'--config={REPO}/configs/tiny.py')
  again = parse(
      f'--config={REPO}/configs/tiny.py',
      '--config.train.steps=5000',
      '--config.optim.lr=0.0001',
      '--config.optim.clip_norm=0.5',
      '--config.data.eval_files=other.txt',
  )
  assert config_lib.diff_resume(again, saved) == []
  again = parse(
      f'--config={REPO}/configs/tiny.py',
      '--config.optim.clip_norm=0',  # no clipping: another optimizer state
      '--config.data.train_files=more.txt',
      '--config.data.tokenizer_train_bytes=1000',  # another tokenizer would be trained
  )
  assert config_lib.diff_resume(again, saved) == [
      ('optim.clip_norm', saved.optim.clip_norm, 0.0),
      ('data.train_files', '', 'more.txt'),
      ('data.tokenizer_train_bytes', saved.data.tokenizer_train_bytes, 1000),
  ]
  with saved.unlocked():  # a config saved before a key existed: the key takes its default
    del saved.data['chat_task']
  assert config_lib.diff_resume(parse(f'--config={REPO}/configs/tiny.py'), saved) == []


def test_config_json_round_trip(tmp_path):
  config = parse(f'--config={REPO}/configs/scout.py')
  config_lib.save(config, str(tmp_path))
  again = config_lib.load(str(tmp_path))
  assert config_lib.diff_model(config, again) == []
  assert config_lib.model_config(again) == config_lib.model_config(config)


@pytest.mark.parametrize('preset', ['tiny', 'scout'])
def test_sft_presets_keep_their_model_and_fit(preset):
  base = parse(f'--config={REPO}/configs/{preset}.py')
  config = parse(f'--config={REPO}/configs/sft.py:{preset}')
  assert config.data.modality == 'chat' and config.optim.weight_decay == 0.0
  assert config.optim.lr < base.optim.lr
  assert config_lib.diff_model(config, base) == []
  config_lib.validate(config, num_devices=128 if preset == 'scout' else 8)


def test_a_fine_tune_takes_the_architecture_of_its_init_model(tmp_path):
  """train.model_from_init: what the model is comes from init_from; how it computes and the
  weights' dtype stay the fine-tune's."""
  saved = parse(f'--config={REPO}/configs/tiny.py', '--config.model.hidden_size=64')
  saved.model.param_dtype, saved.model.remat = 'bfloat16', 'full'
  config_lib.save(saved, str(tmp_path))
  config = parse(f'--config={REPO}/configs/sft.py:tiny', f'--config.train.init_from={tmp_path}')
  config.model.remat = 'layer'
  merged = config_lib.with_init_model(config)
  assert merged.model.hidden_size == 64 and config.model.hidden_size == 128
  assert (merged.model.param_dtype, merged.model.remat) == ('float32', 'layer')
  config.train.model_from_init = False
  assert config_lib.with_init_model(config).model.hidden_size == 128


def test_a_fine_tune_resumes_with_its_own_model_once_its_init_model_is_gone(tmp_path):
  """A resume (the run's config.json and a checkpoint in its workdir) takes the model from its
  own saved config; init_from may be gone. A fresh start still needs init_from."""
  init, run = tmp_path / 'init', tmp_path / 'run'
  saved = parse(f'--config={REPO}/configs/tiny.py', '--config.model.hidden_size=64')
  config_lib.save(saved, str(init))
  config = parse(f'--config={REPO}/configs/sft.py:tiny', f'--config.train.init_from={init}')
  config_lib.save(config_lib.with_init_model(config, str(run)), str(run))  # as the trainer does
  ckpt = checkpoint.TrainCheckpointer(str(run), keep=1)
  ckpt.save(2, {'params': {}, 'opt_state': {}, 'step': np.array(2, np.int32)}, ['{}'])
  ckpt.close()
  shutil.rmtree(init)

  config.model.remat = 'layer'
  resumed = config_lib.with_init_model(config, str(run))
  assert resumed.model.hidden_size == 64 and resumed.model.remat == 'layer'
  with pytest.raises(FileNotFoundError, match=f'{init}/config.json: missing'):
    config_lib.with_init_model(config, str(tmp_path / 'fresh'))
  shutil.rmtree(checkpoint.checkpoint_root(str(run)))  # killed before its first checkpoint
  with pytest.raises(FileNotFoundError, match=f'{init}/config.json: missing'):
    config_lib.with_init_model(config, str(run))


@pytest.mark.parametrize('name', ['scout', 'maverick'])
def test_production_configs_fit_their_meshes(name):
  """Every batch, the first evaluation's included, splits over 64-256 devices (issue 18:
  eval.batch_size=16 once failed on 32 devices at the first eval; evaluation now pads)."""
  config = parse(f'--config={REPO}/configs/{name}.py')
  for devices in (64, 128, 256):
    config_lib.validate(config, num_devices=devices)
    shards = devices // config.mesh.get('tensor', 1)
    rows = sharding.fill_batch_shards(config.eval.batch_size, shards)
    assert rows % shards == 0 and rows >= config.eval.batch_size


def test_a_batch_the_shards_cannot_split_is_named():
  config = parse(
      f'--config={REPO}/configs/tiny.py', '--config.mesh.fsdp=-1', '--config.train.batch_size=9'
  )
  with pytest.raises(config_lib.ConfigError, match='train.batch_size: 9 .* 2 batch shards'):
    config_lib.validate(config, num_devices=2)


def test_model_diff_ignores_how_the_model_is_computed():
  """A resume may change remat, attention blocks, dispatch, compute dtype; a config saved before
  a field existed means its default. What the parameters compute must not change."""
  config = parse(f'--config={REPO}/configs/tiny.py')
  other = mlc.ConfigDict(config.to_dict())
  other.model.remat, other.model.attention_query_block, other.model.dtype = 'layer', 64, 'bfloat16'
  assert config_lib.diff_model(config, other) == []
  saved_before = config.to_dict()
  del saved_before['model']['attention_query_block'], saved_before['model']['attention_key_block']
  assert config_lib.diff_model(config, mlc.ConfigDict(saved_before)) == []
  other.model.hidden_size, other.model.param_dtype = 256, 'bfloat16'
  assert config_lib.diff_model(config, other) == ['hidden_size', 'param_dtype']

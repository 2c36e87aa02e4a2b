"""MaxText as a baseline of `benchmark.py train`: our config in its keys, its command and log.

MaxText itself is not installed here; a stand-in `maxtext` package takes its place, and
records the command line it was given.
"""

import json
import sys
import textwrap

import pytest

from llama4_jax import model as model_lib
from llama4_jax.tools import benchmarks, maxtext_baseline

# Lines of a real run (MaxText at AI-Hypercomputer/maxtext e591f30, on this project's CPU).
_LOG = """\
I1206 17:12:01.029921 140008137431936 metric_logger.py:230] completed step: 0, seconds: 1.954, TFLOP/s/device: 0.447, Tokens/s/device: 2095.933, total_weights: 4096, loss: 9.522
I1206 17:12:19.710956 140008137431936 metric_logger.py:230] completed step: 1, seconds: 0.207, TFLOP/s/device: 4.212, Tokens/s/device: 19755.754, total_weights: 4096, loss: 9.377
I1206 17:12:38.313805 140008137431936 metric_logger.py:230] completed step: 2, seconds: 18.677, TFLOP/s/device: 0.047, Tokens/s/device: 219.308, total_weights: 4096, loss: 9.265
"""  # fmt: skip


def _flags(name: str) -> dict[str, str]:
  overrides, batch, seq_len = benchmarks.TRAIN_CONFIGS[name]
  cfg = model_lib.PRESETS['tiny'].replace(**overrides)
  return dict(f.split('=', 1) for f in maxtext_baseline.maxtext_flags(cfg, batch, seq_len))


def test_our_80m_config_in_maxtexts_keys():
  assert _flags('80m-e8') == {
      **dict(f.split('=', 1) for f in maxtext_baseline.SETTINGS),
      'per_device_batch_size': '8',
      'max_target_length': '512',
      'base_emb_dim': '512',
      'base_num_decoder_layers': '8',
      'base_num_query_heads': '8',
      'base_num_kv_heads': '2',
      'head_dim': '64',
      'base_mlp_dim': '2048',
      'base_moe_mlp_dim': '1024',
      'num_experts': '8',
      'num_experts_per_tok': '1',
      'vocab_size': '8192',
      'chunk_attn_window_size': '128',
      # NoPE on layers 3 and 7, MoE on 1, 3, 5 and 7: MaxText's (i + 1) % p == 0.
      'nope_layer_interval': '4',
      'interleave_moe_layer_step': '2',
      'use_qk_norm': 'true',
      'temperature_tuning': 'true',
      'rope_max_timescale': '10000',
      'normalization_layer_epsilon': '1e-05',
  }
  settings = dict(f.split('=', 1) for f in maxtext_baseline.SETTINGS)
  assert settings['dtype'] == settings['weight_dtype'] == 'float32'
  assert settings['scan_layers'] == 'false'  # unrolled, as ours' 80m configs


def test_layer_patterns_and_chunks_in_maxtexts_terms():
  tiny = model_lib.PRESETS['tiny']
  with pytest.raises(ValueError, match=r'moe_layers=\(0, 1\): .*every p-th layer'):
    maxtext_baseline.maxtext_flags(tiny.replace(moe_layers=(0, 1)), 1, 8)
  dense = tiny.replace(moe_layers=(), no_rope_layers=(1, 1, 1, 1), attention_chunk_size=0)
  flags = dict(f.split('=', 1) for f in maxtext_baseline.maxtext_flags(dense, 1, 8))
  assert flags['interleave_moe_layer_step'] == flags['nope_layer_interval'] == '-1'
  assert flags['chunk_attn_window_size'] == '8'  # no chunks: one of the whole sequence
  unsorted = dict(
      f.split('=', 1) for f in maxtext_baseline.maxtext_flags(tiny.replace(moe_layers=(3, 1)), 1, 8)
  )
  assert unsorted['interleave_moe_layer_step'] == '2'


def test_step_times_are_read_from_maxtexts_log():
  assert maxtext_baseline.step_seconds(_LOG) == {0: 1.954, 1: 0.207, 2: 18.677}


_FAKE_TRAIN = """
import json, sys
with open(__file__ + '.argv', 'w') as f:
  json.dump(sys.argv[1:], f)
steps = int(next(a for a in sys.argv if a.startswith('steps=')).split('=')[1])
for step in range(steps):
  print(f'I1206 metric_logger.py:230] completed step: {step}, seconds: {0.5 + step}, loss: 9')
"""


@pytest.fixture
def fake_maxtext(tmp_path, monkeypatch):
  """A `maxtext` package whose train module logs step s as taking 0.5 + s seconds."""
  package = tmp_path / 'maxtext'
  (package / 'configs').mkdir(parents=True)
  (package / 'trainers' / 'pre_train').mkdir(parents=True)
  for init in ('', 'trainers', 'trainers/pre_train'):
    (package / init / '__init__.py').write_text('')
  (package / 'configs' / 'base.yml').write_text('')
  (package / 'trainers' / 'pre_train' / 'train.py').write_text(textwrap.dedent(_FAKE_TRAIN))
  monkeypatch.setenv('PYTHONPATH', str(tmp_path))
  return package


def test_maxtexts_train_module_runs_with_the_flags_and_its_steps_are_timed(fake_maxtext):
  flags = ['base_emb_dim=64', 'num_experts=4']
  seconds = maxtext_baseline.train_step_seconds(sys.executable, flags, repeats=3)
  assert seconds == [3.5, 4.5, 5.5]  # logged steps 3, 4 and 5: after the compile and first run
  argv = json.loads((fake_maxtext / 'trainers' / 'pre_train' / 'train.py.argv').read_text())
  assert argv[0] == str(fake_maxtext / 'configs' / 'base.yml')
  assert 'steps=6' in argv and argv[-2:] == flags


def test_a_python_without_maxtext_or_a_failed_run_is_named(tmp_path, monkeypatch, fake_maxtext):
  train = fake_maxtext / 'trainers' / 'pre_train' / 'train.py'
  train.write_text(train.read_text() + 'sys.exit(3)\n')
  with pytest.raises(RuntimeError, match=r'MaxText exited with 3 having logged 4 of 4 steps'):
    maxtext_baseline.train_step_seconds(sys.executable, [], repeats=1)
  monkeypatch.setenv('PYTHONPATH', str(tmp_path / 'elsewhere'))
  with pytest.raises(RuntimeError, match=r'--maxtext_python=.*: cannot import maxtext'):
    maxtext_baseline.train_step_seconds(sys.executable, [], repeats=1)


@pytest.mark.slow
def test_train_speed_reports_maxtexts_step_beside_ours(fake_maxtext):
  (row,) = benchmarks.train_speed(
      names=('tiny',), repeats=1, with_transformers=False, maxtext_python=sys.executable
  )
  assert row.maxtext_step_seconds == 3.5 and row.transformers_step_seconds is None
  assert row.maxtext_ratio == pytest.approx(3.5 / row.ours_step_seconds)
  assert row.maxtext_mfu == pytest.approx(row.ours_mfu / row.maxtext_ratio)

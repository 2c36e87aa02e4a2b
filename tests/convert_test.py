"""HF <-> llama4_jax checkpoint conversion: exactness, streaming and bad inputs."""

import json
import os

import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from llama4_jax import checkpoint
from llama4_jax import model as model_lib
from llama4_jax.tools import hf_convert

import hf_reference
import released_tokenizer
import small_run

run_script = small_run.run_script


@pytest.fixture(scope='module')
def hf_checkpoint(tmp_path_factory):
  """A 2-expert-per-token HF checkpoint saved in several shards."""
  path = tmp_path_factory.mktemp('hf')
  model = hf_reference.text_model(num_experts_per_tok=2)
  model.save_pretrained(path, max_shard_size='100KB')
  return path, model


@pytest.mark.reference
@pytest.mark.slow
def test_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, hf_checkpoint):
  hf_dir, hf_model = hf_checkpoint
  result = run_script('convert_checkpoint.py', f'--hf_dir={hf_dir}', f'--workdir={tmp_path}/ours')
  assert result.returncode == 0, result.stderr
  result = run_script(
      'convert_checkpoint.py',
      '--to_hf',
      f'--workdir={tmp_path}/ours',
      f'--hf_dir={tmp_path}/back',
      '--max_shard_gb=0.0001',
  )
  assert result.returncode == 0, result.stderr
  original, back = hf_reference.read_safetensors(hf_dir), hf_reference.read_safetensors(
      tmp_path / 'back'
  )
  assert sorted(original) == sorted(back)
  for name, tensor in original.items():
    assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name
  assert len(list((tmp_path / 'back').glob('*.safetensors'))) > 1

  reloaded = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / 'back').eval()
  tokens = np.random.default_rng(1).integers(0, 128, (1, 40))
  np.testing.assert_array_equal(
      hf_reference.text_logits(reloaded, tokens), hf_reference.text_logits(hf_model, tokens)
  )


@pytest.mark.reference
@pytest.mark.slow
def test_multimodal_checkpoint_text_part_converts(tmp_path, hf_checkpoint):
  """Tensors under `language_model.` with a `llama4` config (vision tensors are skipped)."""
  hf_dir, _ = hf_checkpoint
  tensors = {f'language_model.{k}': v for k, v in hf_reference.read_safetensors(hf_dir).items()}
  tensors['vision_model.class_embedding'] = np.zeros(8, np.float32)
  (tmp_path / 'mm').mkdir()
  save_file(tensors, str(tmp_path / 'mm' / 'model.safetensors'))
  text = json.loads((hf_dir / 'config.json').read_text())
  (tmp_path / 'mm' / 'config.json').write_text(
      json.dumps({'model_type': 'llama4', 'text_config': text, 'vision_config': {}})
  )
  direct = hf_convert.load_hf_model(str(hf_dir))
  via_mm = hf_convert.load_hf_model(str(tmp_path / 'mm'))
  tokens = np.arange(20)[None] % 128
  np.testing.assert_array_equal(np.asarray(direct(tokens)[0]), np.asarray(via_mm(tokens)[0]))


def test_config_fields_survive_hf_round_trip():
  for name in ('scout', 'maverick', 'parity'):
    cfg = model_lib.PRESETS[name]
    again = hf_convert.model_config_from_hf(hf_convert.hf_text_config(cfg))
    fields = ('param_dtype', *model_lib.EXECUTION_FIELDS)  # not in an HF config
    assert again.replace(**{f: getattr(cfg, f) for f in fields}) == cfg, name


@pytest.mark.reference
def test_legacy_hf4_config_keys(hf_checkpoint):
  hf_dir, _ = hf_checkpoint
  c = json.loads((hf_dir / 'config.json').read_text())
  rope = c.pop('rope_parameters')
  c['rope_theta'] = rope.pop('rope_theta')
  c['rope_scaling'] = rope
  c['attn_temperature_tuning'] = 4  # as in early hub configs
  cfg = hf_convert.model_config_from_hf(c)
  assert cfg.rope_type == 'llama3' and cfg.rope_factor == 8.0 and cfg.attn_temperature_tuning


# Bad inputs: each a one-line error naming the file, tensor or field ------------


def copy_checkpoint(src, dst):
  dst.mkdir()
  for file in os.listdir(src):
    (dst / file).write_bytes((src / file).read_bytes())
  return dst


def convert_error(hf_dir, tmp_path):
  result = run_script('convert_checkpoint.py', f'--hf_dir={hf_dir}', f'--workdir={tmp_path}/out')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  return result.stderr.strip().splitlines()[-1]


@pytest.mark.reference
def test_missing_config(tmp_path, hf_checkpoint):
  bad = copy_checkpoint(hf_checkpoint[0], tmp_path / 'bad')
  (bad / 'config.json').unlink()
  assert 'config.json' in convert_error(bad, tmp_path)


def test_missing_directory(tmp_path):
  assert 'not a directory' in convert_error(tmp_path / 'nowhere', tmp_path)


@pytest.mark.reference
def test_other_model_type(tmp_path, hf_checkpoint):
  bad = copy_checkpoint(hf_checkpoint[0], tmp_path / 'bad')
  c = json.loads((bad / 'config.json').read_text())
  c['model_type'] = 'llama'
  (bad / 'config.json').write_text(json.dumps(c))
  message = convert_error(bad, tmp_path)
  assert 'model_type' in message and "'llama'" in message


def rewrite_first_shard(bad, edit):
  index = json.loads((bad / hf_convert.SAFETENSORS_INDEX).read_text())
  file = sorted(set(index['weight_map'].values()))[0]
  with safe_open(str(bad / file), 'np') as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  edit(tensors)
  save_file(tensors, str(bad / file))
  index['weight_map'] = {k: v for k, v in index['weight_map'].items() if v != file}
  index['weight_map'].update({name: file for name in tensors})
  (bad / hf_convert.SAFETENSORS_INDEX).write_text(json.dumps(index))
  return file, sorted(tensors)


@pytest.mark.reference
def test_tensor_shape_mismatch(tmp_path, hf_checkpoint):
  bad = copy_checkpoint(hf_checkpoint[0], tmp_path / 'bad')
  names = []

  def shrink(tensors):
    name = sorted(tensors)[0]
    names.append(name)
    tensors[name] = tensors[name][..., :3].copy()

  file, _ = rewrite_first_shard(bad, shrink)
  message = convert_error(bad, tmp_path)
  assert names[0] in message and file in message and 'shape' in message


@pytest.mark.reference
def test_unknown_tensor(tmp_path, hf_checkpoint):
  bad = copy_checkpoint(hf_checkpoint[0], tmp_path / 'bad')
  file, _ = rewrite_first_shard(
      bad, lambda t: t.update({'model.layers.0.extra.weight': np.ones(2)})
  )
  message = convert_error(bad, tmp_path)
  assert 'model.layers.0.extra.weight' in message and 'unknown tensor' in message


@pytest.mark.reference
def test_index_names_missing_shard(tmp_path, hf_checkpoint):
  bad = copy_checkpoint(hf_checkpoint[0], tmp_path / 'bad')
  shard = sorted(bad.glob('model-*.safetensors'))[1]
  shard.unlink()
  message = convert_error(bad, tmp_path)
  assert shard.name in message and 'missing' in message


@pytest.mark.reference
def test_truncated_safetensors(tmp_path, hf_checkpoint):
  bad = copy_checkpoint(hf_checkpoint[0], tmp_path / 'bad')
  shard = sorted(bad.glob('model-*.safetensors'))[0]
  shard.write_bytes(shard.read_bytes()[:100])
  message = convert_error(bad, tmp_path)
  assert shard.name in message


@pytest.mark.reference
@pytest.mark.slow
def test_refuses_to_overwrite_existing_conversion(tmp_path, hf_checkpoint):
  assert (
      run_script(
          'convert_checkpoint.py', f'--hf_dir={hf_checkpoint[0]}', f'--workdir={tmp_path}/out'
      ).returncode
      == 0
  )
  assert 'exists' in convert_error(hf_checkpoint[0], tmp_path)


@pytest.mark.reference
def test_missing_config_keys_take_the_defaults_of_transformers():
  """transformers drops values equal to its class defaults when it saves a config: a minimal
  config must mean what it means to transformers (chunking at 8192, 8 kv heads, the vision
  tower's defaults), not ours."""
  import transformers

  text = transformers.Llama4TextConfig().to_dict()
  assert hf_convert.model_config_from_hf({'model_type': 'llama4_text'}) == (
      hf_convert.model_config_from_hf(text)
  )
  minimal = hf_convert.model_config_from_hf({'model_type': 'llama4_text'})
  assert minimal.attention_chunk_size == 8192 and minimal.num_kv_heads == 8
  off = hf_convert.model_config_from_hf({'model_type': 'llama4_text', 'attention_chunk_size': None})
  assert off.attention_chunk_size == 0  # an explicit null is HF's "no chunking"
  # The released vision tower, as transformers saves it: without the values equal to its defaults.
  released = dict(
      hidden_size=1408,
      num_hidden_layers=34,
      num_attention_heads=16,
      intermediate_size=5632,
      image_size=336,
      patch_size=14,
      pixel_shuffle_ratio=0.5,
      projector_input_dim=4096,
      projector_output_dim=4096,
      vision_output_dim=4096,
  )
  defaults = transformers.Llama4VisionConfig().to_dict()
  saved = {k: v for k, v in released.items() if defaults[k] != v}
  assert sorted(saved) == ['hidden_size', 'image_size', 'vision_output_dim']
  config = lambda vision: {'model_type': 'llama4', 'text_config': {}, 'vision_config': vision}
  assert hf_convert.vision_config_from_hf(config(saved)) == (
      hf_convert.vision_config_from_hf(config(released))
  )


@pytest.mark.reference
@pytest.mark.slow
def test_released_tokenizer_travels_with_the_checkpoint(tmp_path):
  """A converted checkpoint with a tokenizer.json samples from text and scores text files
  without a tokenizer flag, and exports the tokenizer back."""
  r = released_tokenizer
  hf_dir = tmp_path / 'hf'
  hf_reference.text_model(
      vocab_size=r.VOCAB_SIZE, bos_token_id=r.BOS, eos_token_id=r.EOS, pad_token_id=r.PAD
  ).save_pretrained(hf_dir)
  r.write(hf_dir)
  text = tmp_path / 'fox.txt'
  text.write_text('The quick brown fox jumps over the lazy dog. ' * 4)
  ours = tmp_path / 'ours'
  convert, generate, evaluate, export = small_run.run_scripts(
      tmp_path,
      [
          ['convert_checkpoint.py', f'--hf_dir={hf_dir}', f'--workdir={ours}'],
          [
              'generate.py',
              f'--workdir={ours}',
              '--prompt=The quick brown',
              '--max_new_tokens=3',
              f'--output={tmp_path}/ids.json',
          ],
          ['eval.py', f'--workdir={ours}', f'--files={text}', '--seq_len=16', '--batch_size=8'],
          ['convert_checkpoint.py', '--to_hf', f'--workdir={ours}', f'--hf_dir={tmp_path}/back'],
      ],
  )
  for result in (convert, generate, evaluate, export):
    assert result['status'] == 0, result['output'][-3000:]
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / 'tokenizer.json'))
  [ids] = json.loads((tmp_path / 'ids.json').read_text())['ids']
  assert len(ids) == 3 and "'The quick brown" in generate['output']
  assert tokenizer.decode(tokenizer.encode('The quick brown')[1:]) == 'The quick brown'
  assert 'loss' in evaluate['output']
  for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
    assert (ours / 'tokenizer' / name).read_bytes() == (hf_dir / name).read_bytes(), name
    assert (tmp_path / 'back' / name).read_bytes() == (hf_dir / name).read_bytes(), name


def test_export_yields_tensors_that_hold_no_stack():
  """--to_hf streams: each yielded tensor owns its memory, so one waiting in a shard holds no
  stacked tensor alive, and the fused gate_up of each layer is made alone, never of whole
  stacks."""
  cfg = model_lib.PRESETS['parity']
  params = nnx.state(model_lib.abstract_model(cfg), nnx.Param)
  rng = np.random.default_rng(0)
  flat = {
      name: rng.standard_normal(leaf.shape).astype(np.float32)
      for name, leaf in checkpoint.flatten_tree(params).items()
  }
  yielded = list(hf_convert.iter_hf_tensors(flat.__getitem__, cfg))
  assert {name for name, _ in yielded} == set(hf_convert.expected_hf_shapes(cfg))
  for name, tensor in yielded:
    assert tensor.flags.c_contiguous and tensor.flags.owndata, name

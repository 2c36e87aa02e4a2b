"""Bad input to the scripts and loaders: each a clear one-line error and a non-zero exit.

TESTING.md lists every bad input tried, with the test that checks it (here or in the
module the input belongs to). The command lines run through tests/cli_runner.py: one
interpreter imports the project, and each command runs in its own forked process.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from llama4_jax import checkpoint, config_lib
from llama4_jax import model as model_lib
from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib

import small_run

# Its module fixtures are expensive: one test worker runs the whole file (pyproject.toml).
pytestmark = pytest.mark.xdist_group(__name__)

REPO = small_run.REPO


class Payload:
  """Unpickling it creates a file: the proof that a loader ran code from a data file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return pathlib.Path.touch, (pathlib.Path(self.marker),)


def write_pickled_npy(path, marker):
  np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)


def write_run(workdir, config):
  """A workdir as training or conversion leaves it: config.json and a checkpoint (step 0)."""
  cfg = config_lib.model_config(config)
  model = model_lib.Llama4(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
  params = checkpoint.flatten_tree(nnx.state(model, nnx.Param))
  checkpoint.write_params_streaming(
      checkpoint.step_path(str(workdir), 0), ((name, np.asarray(x)) for name, x in params.items())
  )
  config_lib.save(config, str(workdir))


def write_image_files(root, config):
  """A multimodal run (the small model with a tiny vision tower), a tokenizer and bad images."""
  from PIL import Image

  from llama4_jax.model import vision

  tokenizer_lib.train_tokenizer(
      ['What colour are the shapes? red green blue'] * 50,
      vocab_size=300,
      output_path=str(root / 'tok.model'),
  )
  mm_config = config.copy_and_resolve_references()
  with mm_config.unlocked():
    mm_config.model.vision = vision.VisionConfig(
        hidden_size=16,
        num_heads=2,
        num_layers=1,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        projector_input_dim=16,
        projector_output_dim=16,
        vision_output_dim=16,
        max_tiles=1,
        image_token_id=12,
        boi_token_id=9,
        eoi_token_id=10,
    ).to_dict()
  write_run(root / 'mm_run', mm_config)
  # The same run, but its model reads images at another id than the tokenizer's <|patch|> (12).
  shutil.copytree(root / 'mm_run', root / 'mm_other_patch')
  config_json = json.loads((root / 'mm_run' / 'config.json').read_text())
  config_json['model']['vision']['image_token_id'] = 13
  (root / 'mm_other_patch' / 'config.json').write_text(json.dumps(config_json))
  Image.new('RGB', (16, 16), (255, 0, 0)).save(root / 'red.png')
  Image.new('RGB', (64, 64), (0, 255, 0)).save(root / 'big.png')
  (root / 'truncated.png').write_bytes((root / 'big.png').read_bytes()[:60])
  (root / 'text.png').write_text('not an image')
  Image.new('F', (16, 16)).save(root / 'float.tiff')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Every workdir and file the command lines below refer to, by name."""
  root = tmp_path_factory.mktemp('bad_input')
  config = small_run.config()
  write_run(root / 'run', config)  # the small model: vocabulary 512, 4096 positions
  shutil.copytree(root / 'run', root / 'resume')  # a run to resume with another model
  shutil.copytree(root / 'run', root / 'damaged')
  metadata = checkpoint.step_path(str(root / 'damaged'), 0) / 'state' / '_METADATA'
  metadata.write_bytes(metadata.read_bytes()[:100])
  # Another architecture's config next to this checkpoint.
  shutil.copytree(root / 'run', root / 'other_arch')
  config_json = json.loads((root / 'run' / 'config.json').read_text())
  config_json['model']['hidden_size'] = 128
  (root / 'other_arch' / 'config.json').write_text(json.dumps(config_json))
  shutil.copytree(root / 'run', root / 'bad_json')
  (root / 'bad_json' / 'config.json').write_text('{"model": {"vocab_size": 5')
  (root / 'no_checkpoint').mkdir()
  shutil.copy(root / 'run' / 'config.json', root / 'no_checkpoint')

  np.save(root / 'tokens.npy', np.arange(1, 200) % 500)
  np.save(root / 'short.npy', np.array([5]))
  np.save(root / 'matrix.npy', np.ones((4, 10), np.int32))
  write_pickled_npy(root / 'pickled.npy', root / 'pickle_ran')
  (root / 'empty.txt').write_bytes(b'')
  (root / 'latin1.txt').write_bytes('caf\xe9 cr\xe8me'.encode('latin-1'))
  (root / 'raising.py').write_text('def get_config():\n  raise ValueError("broken on purpose")\n')
  (root / 'hf_bad_json').mkdir()
  (root / 'hf_bad_json' / 'config.json').write_text('{"model_type": "llama4_text",')
  write_image_files(root, config)
  (root / 'hf_no_weights').mkdir()
  from llama4_jax.tools import hf_convert

  (root / 'hf_no_weights' / 'config.json').write_text(
      json.dumps(hf_convert.hf_text_config(config_lib.model_config(config)))
  )
  return root


def train(*flags, **overrides):
  """scripts/train.py with the small test config (overrides as in small_run.flag_list)."""
  return ['train.py', *small_run.flag_list(**overrides), *flags]


# id: (command line, strings the one-line error must contain). {root} is the `files` fixture.
CASES = {
    # train.py: the config
    'train-unknown-key': (train('--workdir={root}/w1', '--config.train.stepz=7'), ['stepz']),
    'train-wrong-type': (
        train('--workdir={root}/w2', '--config.train.steps=many'),
        ['steps', 'many'],
    ),
    'train-mesh-too-big': (train('--workdir={root}/w3', mesh__fsdp=16), ['config.mesh', '16', '8']),
    'train-seq-len-too-long': (
        train('--workdir={root}/w4', data__seq_len=100000),
        ['config.data.seq_len', '100000', 'max_position_embeddings=4096'],
    ),
    'train-zero-steps': (
        train('--workdir={root}/w5', train__steps=0),
        ['config.train.steps', 'must be positive'],
    ),
    'train-keep-no-checkpoints': (
        train('--workdir={root}/w5k', train__keep_checkpoints=0),
        ['config.train.keep_checkpoints: must be positive, got 0'],
    ),
    'train-missing-config-file': (
        ['train.py', '--config=configs/nope.py', '--workdir={root}/w6'],
        ['nope.py'],
    ),
    'train-config-file-raises': (
        ['train.py', '--config={root}/raising.py', '--workdir={root}/w7'],
        ['the config file raised ValueError', 'broken on purpose'],
    ),
    'train-no-workdir': (train(), ['workdir']),
    # train.py: the data
    'train-no-data-files': (
        train('--workdir={root}/w8', data__train_files='{root}/none*.txt'),
        ['No files match', 'none*.txt'],
    ),
    'train-empty-data-file': (
        train('--workdir={root}/w9', data__train_files='{root}/empty.txt'),
        ['empty.txt: file is empty'],
    ),
    'train-undecodable-text': (
        train('--workdir={root}/w10', data__train_files='{root}/latin1.txt'),
        ['latin1.txt: invalid UTF-8 at byte offset 3'],
    ),
    # train.py: the workdir and init_from
    'train-resume-with-another-model': (
        train('--workdir={root}/resume', model__hidden_size=128),
        ['holds checkpoints of a different model', 'model.hidden_size: 64 -> 128'],
    ),
    'train-resume-with-another-data-stream': (
        train('--workdir={root}/resume', train__batch_size=16, seed=3),
        [
            'data position and optimizer state belong to other settings',
            'seed: 0 -> 3',
            'train.batch_size: 8 -> 16',
            'train.init_from={root}/resume',
        ],
    ),
    'train-init-from-another-architecture': (
        train(
            '--workdir={root}/w11',
            model__hidden_size=128,
            train__init_from='{root}/run',
            data__tokenizer='{root}/tok.model',
        ),
        ['parameter embed has shape (512, 64) in the checkpoint but (512, 128) in the model'],
    ),
    # A fine-tune reads text with its model's tokenizer; a model without one is not guessed at.
    'train-init-from-a-run-without-tokenizer': (
        train('--workdir={root}/w12', train__init_from='{root}/run'),
        ['{root}/run: no tokenizer', 'config.data.tokenizer for training'],
    ),
    # eval.py
    'eval-no-workdir': (['eval.py', '--workdir={root}/nowhere'], ['nowhere: no such workdir']),
    'eval-config-not-json': (
        ['eval.py', '--workdir={root}/bad_json'],
        ['config.json: not valid JSON'],
    ),
    'eval-step-and-all-steps': (
        ['eval.py', '--workdir={root}/run', '--step=0', '--all_steps'],
        ['not both'],
    ),
    'eval-tokens-with-nothing-to-predict': (
        ['eval.py', '--workdir={root}/run', '--tokens={root}/short.npy', '--seq_len=8'],
        ['1 token(s), fewer than 2: no next token to predict'],
    ),
    'eval-tokens-not-1d': (
        ['eval.py', '--workdir={root}/run', '--tokens={root}/matrix.npy'],
        ['matrix.npy', '1-D integer array', '(4, 10)'],
    ),
    'eval-tokens-pickled': (
        ['eval.py', '--workdir={root}/run', '--tokens={root}/pickled.npy'],
        ['pickled.npy', 'allow_pickle=False'],
    ),
    'eval-seq-len-too-long': (
        ['eval.py', '--workdir={root}/run', '--tokens={root}/tokens.npy', '--seq_len=100000'],
        ['seq_len=100000', 'max_position_embeddings=4096'],
    ),
    'eval-damaged-checkpoint': (
        ['eval.py', '--workdir={root}/damaged', '--tokens={root}/tokens.npy', '--seq_len=8'],
        ['_METADATA: damaged checkpoint file'],
    ),
    'eval-batch-size-zero': (
        ['eval.py', '--workdir={root}/run', '--tokens={root}/tokens.npy', '--batch_size=0'],
        ['--batch_size=0', '0 is not a positive integer'],
    ),
    # generate.py
    'generate-top-p-zero': (
        ['generate.py', '--workdir={root}/run', '--prompt_ids=1,2', '--top_p=0'],
        ['--top_p must be in (0, 1]'],
    ),
    'generate-negative-temperature': (
        ['generate.py', '--workdir={root}/run', '--prompt_ids=1,2', '--temperature=-1'],
        ['--temperature=-1'],
    ),
    'generate-no-prompt': (['generate.py', '--workdir={root}/run'], ['give at least one --prompt']),
    'generate-ids-out-of-range': (
        ['generate.py', '--workdir={root}/run', '--prompt_ids=1,99999'],
        ['ids must be in [0, 512)', '99999'],
    ),
    'generate-ids-not-integers': (
        ['generate.py', '--workdir={root}/run', '--prompt_ids=1,a'],
        ['expected comma-separated integers'],
    ),
    'generate-prompt-longer-than-cache': (
        [
            'generate.py',
            '--workdir={root}/run',
            '--prompt_ids=' + ','.join(['5'] * 4097),
            '--max_new_tokens=1',
        ],
        ['prompt of 4097 tokens', "exceeds the model's max_position_embeddings=4096"],
    ),
    'generate-no-workdir': (
        ['generate.py', '--workdir={root}/nowhere', '--prompt_ids=1'],
        ['config.json: missing'],
    ),
    'generate-step-not-saved': (
        ['generate.py', '--workdir={root}/run', '--step=7', '--prompt_ids=1'],
        ['no checkpoint for step 7; saved steps: [0]'],
    ),
    # --chat stops at the tokenizer's <|eot|>: ids alone are not enough.
    'generate-chat-without-a-tokenizer': (
        ['generate.py', '--workdir={root}/run', '--prompt_ids=1,2', '--chat'],
        ['--chat answers until <|eot|>, which needs a tokenizer', 'no tokenizer'],
    ),
    'generate-tokenizer-file-missing': (
        ['generate.py', '--workdir={root}/run', '--tokenizer={root}/none.model', '--prompt=hi'],
        ['none.model'],
    ),
    'generate-checkpoint-of-another-architecture': (
        ['generate.py', '--workdir={root}/other_arch', '--prompt_ids=1'],
        ['parameter embed has shape (512, 64) in the checkpoint but (512, 128) in the model'],
    ),
    'generate-damaged-checkpoint': (
        ['generate.py', '--workdir={root}/damaged', '--prompt_ids=1'],
        ['_METADATA: damaged checkpoint file'],
    ),
    # generate.py with images
    'generate-image-missing': (
        ['generate.py', '--workdir={root}/mm_run', '--prompt_ids=1', '--image={root}/none.png'],
        ['none.png', 'does not exist'],
    ),
    'generate-image-not-an-image': (
        ['generate.py', '--workdir={root}/mm_run', '--prompt_ids=1', '--image={root}/text.png'],
        ['text.png', 'not an image file'],
    ),
    'generate-image-truncated': (
        [
            'generate.py',
            '--workdir={root}/mm_run',
            '--prompt_ids=1',
            '--image={root}/truncated.png',
        ],
        ['Cannot decode image file', 'truncated.png'],
    ),
    'generate-image-mode-not-rgb': (
        ['generate.py', '--workdir={root}/mm_run', '--prompt_ids=1', '--image={root}/float.tiff'],
        ['float.tiff', "pixel mode 'F'"],
    ),
    'generate-more-images-than-placeholders': (
        [
            'generate.py',
            '--workdir={root}/mm_run',
            '--tokenizer={root}/tok.model',
            '--prompt=<|image|>red',
            '--image={root}/red.png',
            '--image={root}/red.png',
        ],
        ['1 <|image|> placeholder but 2 images were given'],
    ),
    'generate-image-with-another-patch-id': (
        [
            'generate.py',
            '--workdir={root}/mm_other_patch',
            '--tokenizer={root}/tok.model',
            '--prompt=<|image|>red',
            '--image={root}/red.png',
        ],
        ["the tokenizer's <|patch|> id is 12, but config.model.vision.image_token_id is 13"],
    ),
    'generate-more-placeholders-than-images': (
        [
            'generate.py',
            '--workdir={root}/mm_run',
            '--tokenizer={root}/tok.model',
            '--prompt=<|image|><|image|>red',
            '--image={root}/red.png',
        ],
        ['2 <|image|> placeholders but 1 image was given'],
    ),
    'generate-image-for-a-text-model': (
        ['generate.py', '--workdir={root}/run', '--prompt_ids=1', '--image={root}/red.png'],
        ['has no vision tower'],
    ),
    # convert_checkpoint.py
    'convert-config-not-json': (
        ['convert_checkpoint.py', '--hf_dir={root}/hf_bad_json', '--workdir={root}/c1'],
        ['config.json: not valid JSON'],
    ),
    'convert-no-safetensors': (
        ['convert_checkpoint.py', '--hf_dir={root}/hf_no_weights', '--workdir={root}/c2'],
        ['no *.safetensors files'],
    ),
    'convert-to-hf-over-a-checkpoint': (
        ['convert_checkpoint.py', '--to_hf', '--workdir={root}/run', '--hf_dir={root}/hf_bad_json'],
        ['hf_bad_json already holds a checkpoint (config.json)', 'empty or new --hf_dir'],
    ),
    'convert-to-hf-without-checkpoint': (
        [
            'convert_checkpoint.py',
            '--to_hf',
            '--workdir={root}/no_checkpoint',
            '--hf_dir={root}/c3',
        ],
        ['no complete checkpoint'],
    ),
}


@pytest.fixture(scope='module')
def results(files, tmp_path_factory):
  """Runs every command line of CASES once (in one cli_runner); {id: {status, output}}."""
  tmp = tmp_path_factory.mktemp('cli')
  tokenizer_cache = tmp / 'tokenizer'  # the train.py cases that get that far share one
  cases = []
  for args, _ in CASES.values():
    args = [a.format(root=files) for a in args]
    if args[0] == 'train.py':
      args.append(f'--config.data.tokenizer_cache={tokenizer_cache}')
    cases.append(args)
  (tmp / 'cases.json').write_text(json.dumps(cases))
  subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, 'tests', 'cli_runner.py'),
          str(tmp / 'cases.json'),
          str(tmp / 'results.json'),
      ],
      check=True,
      cwd=REPO,
  )
  return dict(zip(CASES, json.loads((tmp / 'results.json').read_text())))


@pytest.mark.slow
@pytest.mark.parametrize('case', list(CASES))
def test_command_line(case, results, files):
  result = results[case]
  output = result['output']
  assert result['status'] == 1, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  last = output.strip().splitlines()[-1]
  assert last.startswith('error: '), output[-3000:]
  for expected in CASES[case][1]:
    assert expected.format(root=files) in last, last


@pytest.mark.slow
def test_nothing_was_overwritten_or_ran(results, files):
  """The refused resume left its workdir as it was; the pickled array never ran its code."""
  assert 'hidden_size": 64' in (files / 'resume' / 'config.json').read_text()
  assert checkpoint.all_steps(str(files / 'resume')) == [0]
  assert not (files / 'pickle_ran').exists()
  # --to_hf refused to write over an existing checkpoint: nothing was added beside it.
  assert sorted(p.name for p in (files / 'hf_bad_json').iterdir()) == ['config.json']


def test_eval_and_generate_fall_back_from_a_damaged_newest_checkpoint(
    files, tmp_path, caplog, monkeypatch
):
  """As training does: the newest checkpoint unreadable -> a warning and the one before it."""
  from llama4_jax import evaluation
  from llama4_jax import workdir as workdir_lib

  monkeypatch.setattr(checkpoint, 'RETRY_DELAY_S', 0)  # its reads fail on every retry

  run = tmp_path / 'run'
  shutil.copytree(files / 'run', run)
  shutil.copytree(checkpoint.step_path(str(run), 0), checkpoint.step_path(str(run), 5))
  metadata = checkpoint.step_path(str(run), 5) / 'state' / '_METADATA'
  metadata.write_bytes(metadata.read_bytes()[:100])
  with caplog.at_level('WARNING'):
    _, _, step = workdir_lib.load_model(str(run))  # generate.py's loader
  assert step == 0 and 'checkpoint step 5 cannot be read, trying an older one' in caplog.text
  rows = evaluation.evaluate_workdir(
      str(run), tokens=str(files / 'tokens.npy'), seq_len=8, log=lambda _: None
  )
  assert [r['step'] for r in rows] == [0]
  assert checkpoint.saved_steps(str(run)) == [0, 5]  # nothing moved: eval and generate only read
  with pytest.raises(checkpoint.CheckpointError, match='_METADATA'):
    workdir_lib.load_model(str(run), step=5)  # a step asked for must be readable


# Safe loading ------------------------------------------------------------------------------


def test_pickled_token_arrays_are_refused_without_running_them(tmp_path):
  """Token files load with allow_pickle=False: a pickled .npy is an error, its code never runs."""
  path, marker = tmp_path / 'evil.npy', tmp_path / 'ran'
  write_pickled_npy(path, marker)
  ids = tokenizer_lib.TokenIds(vocab_size=512, bos_id=1, eos_id=2, pad_id=0)
  with pytest.raises(
      text_data.DataError, match='evil.npy: not a readable .npy array.*allow_pickle'
  ):
    text_data.load_documents(str(path), ids, builtin_split='train', builtin_max_bytes=0)
  assert not marker.exists()
  np.load(path, allow_pickle=True)  # the file is a live payload: a pickle-loader would run it
  assert marker.exists()


@pytest.mark.reference
def test_no_loader_can_run_code():
  """Weights load through safetensors and Orbax, tokens through numpy without pickle."""
  unsafe = re.compile(
      r'^\s*(import|from)\s+(c?pickle|dill|joblib|marshal|shelve)\b|'
      r'\btorch\.load\(|\byaml\.(unsafe_)?load\(|allow_pickle=True',
      re.M,
  )
  sources = [p for d in ('llama4_jax', 'scripts') for p in pathlib.Path(REPO, d).rglob('*.py')]
  assert len(sources) > 10
  for path in sources:
    text = path.read_text()
    assert not unsafe.search(text), path
    for call in re.findall(r'np\.load\([^)]*\)', text):
      assert 'allow_pickle=False' in call, (path, call)


@pytest.mark.slow
@pytest.mark.parametrize('flag', ['--traceback', '--traceback=true'])
def test_traceback_flag_shows_the_traceback(flag, tmp_path):
  """--traceback, in either of absl's spellings, raises the error with its traceback."""
  result = small_run.run_script(
      'convert_checkpoint.py', f'--hf_dir={tmp_path}/missing', f'--workdir={tmp_path}/w', flag
  )
  assert result.returncode == 1 and 'Traceback' in result.stderr, result.stderr[-3000:]

"""Tests for llama4_jax.data.tokenizer."""

import os
import subprocess
import sys

import ml_collections as mlc
import pytest
import sentencepiece as spm

from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    'def f(x):\n    return x  + 1\n',
    'Unicode: wörld, 漢字, emoji 😀, tabs\t\tand CRLF\r\n',
    '',
    '   leading and trailing spaces   ',
]


@pytest.fixture(scope='module')
def tok():
  texts = [text for _, text in text_data.builtin_documents('train', 200_000)]
  return tokenizer_lib.train_tokenizer(texts, vocab_size=512)


@pytest.mark.parametrize('text', TEXTS)
def test_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_vocab_and_ids(tok):
  assert tok.vocab_size == 512
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.eot_id == tok.special_token_id('<|eot|>')
  ids = [tok.special_token_id(n) for n in tokenizer_lib.SPECIAL_TOKENS]
  assert len(set(ids)) == len(ids)
  with pytest.raises(KeyError):
    tok.special_token_id('<|nope|>')


@pytest.mark.parametrize('name', tokenizer_lib.SPECIAL_TOKENS)
def test_special_strings_encode_to_single_ids(tok, name):
  ids = tok.encode(f'a {name} b')
  assert tok.special_token_id(name) in ids
  assert tok.decode(ids) == f'a {name} b'


def test_data_text_keeps_special_token_strings_as_text(tok):
  """A `<|patch|>` inside a document is text: it must not become an image slot or an EOS."""
  text = 'x <|patch|><|end_of_text|> y <|eot'
  special = set(tok.special_token_id(n) for n in tokenizer_lib.SPECIAL_TOKENS)
  for ids in (tok.encode_text(text), tok.encode_batch([text, 'plain'])[0]):
    assert not special & set(ids)
    assert tok.decode(ids) == text
  assert tok.encode_batch(['plain']) == [tok.encode('plain')]


def test_bos_eos_flags_and_skip_special(tok):
  ids = tok.encode('hello', bos=True, eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert ids[1:-1] == tok.encode('hello')
  assert tok.decode(ids, skip_special=True) == 'hello'
  assert tok.encode_batch(['a b', 'hello']) == [tok.encode('a b'), tok.encode('hello')]


def test_format_chat_matches_template(tok):
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi there!'}]
  ids = tok.format_chat(messages)
  template = (
      '<|begin_of_text|>'
      '<|header_start|>system<|header_end|>\n\nBe brief.<|eot|>'
      '<|header_start|>user<|header_end|>\n\nHi there!<|eot|>'
      '<|header_start|>assistant<|header_end|>\n\n'
  )
  assert ids == tok.encode(template)
  assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
  no_prompt = tok.format_chat(messages, add_generation_prompt=False)
  assert no_prompt[-1] == tok.eot_id
  assert ids[: len(no_prompt)] == no_prompt


def test_training_is_deterministic(tok):
  texts = [text for _, text in text_data.builtin_documents('train', 200_000)]
  again = tokenizer_lib.train_tokenizer(texts, vocab_size=512)
  assert again.encode(TEXTS[0] + TEXTS[1]) == tok.encode(TEXTS[0] + TEXTS[1])


def test_builtin_tokenizer_is_cached(tmp_path, monkeypatch):
  cache = str(tmp_path)
  data = mlc.ConfigDict(dict(train_files='', tokenizer_train_bytes=100_000))
  first = tokenizer_lib.load_or_train(data, 400, cache)
  assert [f for f in os.listdir(cache) if f.endswith('.tmp')] == []
  assert len(os.listdir(cache)) == 1

  def fail(*args, **kwargs):
    raise AssertionError('should reuse the cached model')

  monkeypatch.setattr(tokenizer_lib, 'train_tokenizer', fail)
  second = tokenizer_lib.load_or_train(data, 400, cache)
  assert second.encode(TEXTS[0]) == first.encode(TEXTS[0])


def _run_config(**data):
  defaults = dict(tokenizer='', tokenizer_cache='', tokenizer_train_bytes=100_000, train_files='')
  return mlc.ConfigDict(dict(data=defaults | data, train=dict(init_from='')))


def test_load_tokenizer_from_config(tmp_path):
  config = _run_config()
  tok = tokenizer_lib.load_tokenizer(config, 400, workdir=str(tmp_path / 'run'))
  assert tok.vocab_size == 400
  path = tokenizer_lib.trained_tokenizer_path(str(tmp_path / 'run' / 'tokenizer'), config.data, 400)
  assert os.path.exists(path)
  config.data.tokenizer_cache = str(tmp_path / 'cache')
  tokenizer_lib.load_tokenizer(config, 400, workdir=str(tmp_path / 'run'))
  assert os.listdir(tmp_path / 'cache')
  config.data.tokenizer = path
  assert tokenizer_lib.load_tokenizer(config, 400).vocab_size == 400
  with pytest.raises(ValueError, match='raise model.vocab_size'):
    tokenizer_lib.load_tokenizer(config, vocab_size=300)


def test_a_run_on_its_own_files_trains_its_own_tokenizer(tmp_path):
  """Without data.tokenizer, text files get a tokenizer of their own, not the built-in one."""
  plays = tmp_path / 'plays.txt'
  plays.write_text('HAMLET. To be, or not to be, that is the question.\n' * 200)
  config = _run_config(train_files=str(plays))
  tok = tokenizer_lib.load_tokenizer(config, 340, workdir=str(tmp_path / 'run'))
  cached = tokenizer_lib.trained_tokenizer_path(
      str(tmp_path / 'run' / 'tokenizer'), config.data, 340
  )
  assert os.path.basename(cached).startswith('files_') and os.path.exists(cached)
  assert len(tok.encode('HAMLET')) == 1  # its merges are the play's words
  run = mlc.ConfigDict(config.to_dict() | dict(model=dict(vocab_size=340)))
  assert tokenizer_lib.run_tokenizer(str(tmp_path / 'run'), run).encode('HAMLET') == tok.encode(
      'HAMLET'
  )


def test_too_small_a_vocabulary_is_named():
  with pytest.raises(ValueError, match='vocab_size=40 is too small for this text'):
    tokenizer_lib.train_tokenizer(TEXTS, 40)


def test_foreign_model_is_rejected(tmp_path):
  path = str(tmp_path / 'plain.model')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXTS[:2] * 50), model_prefix=path[:-6], vocab_size=39, minloglevel=2
  )
  with pytest.raises(ValueError, match='lacks special token'):
    tokenizer_lib.Tokenizer.load(path)


@pytest.mark.slow
def test_train_tokenizer_script(tmp_path):
  text_file = tmp_path / 'corpus.txt'
  text_file.write_text('\n'.join(TEXTS * 100))
  output = tmp_path / 'sub' / 'tok.model'
  subprocess.run(
      [
          sys.executable,
          os.path.join(REPO_ROOT, 'scripts', 'train_tokenizer.py'),
          f'--output={output}',
          '--vocab_size=400',
          f'--files={text_file}',
      ],
      check=True,
      capture_output=True,
      cwd=REPO_ROOT,
  )
  tok = tokenizer_lib.Tokenizer.load(str(output))
  assert tok.vocab_size == 400
  assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]

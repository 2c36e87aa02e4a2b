"""A released Llama 4 `tokenizer.json`, read with `tokenizers`: ids, specials, chat format.

The reference is `transformers`' own tokenizer loaded from the same file and its
`apply_chat_template` with the released template (tests/released_tokenizer.py).
"""

import json

import pytest
import transformers

from llama4_jax.data import tokenizer as tokenizer_lib

import released_tokenizer

TEXTS = [
    'The quick brown fox jumps over the lazy dog.',
    "It's 12:30; we'll see 2024-07-26.\n\n\nNew paragraph\r\n  indented",
    'def f(x):\n    return x + 1\n',
    'Unicode: wörld, 漢字, emoji 😀',
    '   leading and trailing spaces   ',
    '',
]
CHATS = [
    [{'role': 'user', 'content': 'Hi there!'}],
    [
        {'role': 'system', 'content': '  Be brief.\n'},
        {'role': 'user', 'content': 'What is 12 + 30?'},
        {'role': 'assistant', 'content': 'The answer is 42.'},
        {'role': 'user', 'content': '\nAnd 1 + 1?  '},
    ],
    [
        {'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What is it?'}]},
        {'role': 'assistant', 'content': [{'type': 'text', 'text': ' A fox.'}]},
    ],
    [
        {
            'role': 'user',
            'content': [{'type': 'text', 'text': 'Two:'}, {'type': 'image'}, {'type': 'image'}],
        }
    ],
    # Adjacent text parts are one text to the template: BPE merges across their boundary.
    [
        {
            'role': 'user',
            'content': [
                {'type': 'text', 'text': 'The qu'},
                {'type': 'text', 'text': 'ick brown fox'},
                {'type': 'image'},
                {'type': 'text', 'text': ' jum'},
                {'type': 'text', 'text': 'ps'},
            ],
        },
        {
            'role': 'assistant',
            'content': [{'type': 'text', 'text': 'The la'}, {'type': 'text', 'text': 'zy dog.'}],
        },
    ],
    # A leading system message as one text part: trimmed, as a string is.
    [
        {'role': 'system', 'content': [{'type': 'text', 'text': ' Be brief. '}]},
        {'role': 'user', 'content': 'Hi'},
    ],
]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('released')
  released_tokenizer.write(folder)
  return folder


@pytest.fixture(scope='module')
def ours(folder):
  return tokenizer_lib.load(str(folder / 'tokenizer.json'))


@pytest.fixture(scope='module')
def theirs(folder):
  return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / 'tokenizer.json'))


def test_special_tokens_at_the_released_ids(ours):
  r = released_tokenizer
  assert ours.vocab_size == r.VOCAB_SIZE
  assert (ours.bos_id, ours.eos_id, ours.eot_id, ours.pad_id) == (r.BOS, r.EOS, r.EOT, r.PAD)
  assert ours.special_token_id('<|image|>') == r.IMAGE
  assert ours.special_token_id('<|patch|>') == r.PATCH
  assert ours.special_token_id('<|header_start|>') == 200_005


@pytest.mark.parametrize('text', TEXTS)
def test_ids_equal_transformers_and_round_trip(ours, theirs, text):
  assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
  assert ours.encode(text, bos=True) == theirs.encode(text)  # its post-processor's BOS
  assert ours.decode(ours.encode(text)) == text
  assert ours.encode_batch([text, 'x']) == [ours.encode(text), ours.encode('x')]


def test_special_strings(ours, theirs):
  text = 'a <|eot|> b <|patch|>'
  assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
  assert released_tokenizer.EOT in ours.encode(text)
  as_text = ours.encode_text(text)  # data text: the strings stay text
  assert released_tokenizer.EOT not in as_text and released_tokenizer.PATCH not in as_text
  assert ours.decode(as_text) == text
  assert ours.decode(ours.encode(text, bos=True), skip_special=True) == 'a  b '


@pytest.mark.parametrize('chat', range(len(CHATS)))
@pytest.mark.parametrize('generation_prompt', [True, False])
def test_chat_format_equals_the_released_template(ours, theirs, folder, chat, generation_prompt):
  template = json.loads((folder / 'tokenizer_config.json').read_text())['chat_template']
  text = theirs.apply_chat_template(
      CHATS[chat],
      chat_template=template,
      tokenize=False,
      add_generation_prompt=generation_prompt,
      bos_token='<|begin_of_text|>',
  )
  expected = theirs.encode(text, add_special_tokens=False)
  assert ours.format_chat(CHATS[chat], add_generation_prompt=generation_prompt) == expected


def test_adjacent_text_parts_are_encoded_as_one_text(ours):
  split = [{'type': 'text', 'text': 'The qu'}, {'type': 'text', 'text': 'ick brown fox'}]
  joined = [{'role': 'user', 'content': 'The quick brown fox'}]
  assert ours.format_chat([{'role': 'user', 'content': split}]) == ours.format_chat(joined)


def test_a_system_message_of_several_parts_keeps_all_its_text(ours, theirs, folder):
  """The documented difference: the template keeps only the first part's text."""
  parts = [{'type': 'text', 'text': ' Be brief. '}, {'type': 'text', 'text': 'Be kind. '}]
  chat = [{'role': 'system', 'content': parts}, {'role': 'user', 'content': 'Hi'}]
  as_string = [{'role': 'system', 'content': 'Be brief. Be kind.'}, chat[1]]
  assert ours.format_chat(chat) == ours.format_chat(as_string)
  template = json.loads((folder / 'tokenizer_config.json').read_text())['chat_template']
  text = theirs.apply_chat_template(
      chat, chat_template=template, tokenize=False, bos_token='<|begin_of_text|>'
  )
  assert 'system<|header_end|>\n\nBe brief.<|eot|>' in text


def test_assistant_tokens_are_its_content_and_closing_eot(ours):
  chat = ours.chat_tokens(CHATS[1])
  learned = [i for i, a in zip(chat.ids, chat.is_assistant) if a]
  assert ours.decode(learned) == 'The answer is 42.<|eot|>'
  assert sum(chat.is_assistant) == len(ours.encode('The answer is 42.')) + 1


def test_load_reads_either_kind_and_names_bad_files(folder, tmp_path):
  assert isinstance(tokenizer_lib.load(str(folder)), tokenizer_lib.ReleasedTokenizer)
  bad = tmp_path / 'tokenizer.json'
  bad.write_text('{"not": "a tokenizer"}')
  with pytest.raises(ValueError, match=f'{bad}: not a tokenizers JSON file'):
    tokenizer_lib.load(str(bad))
  with pytest.raises(FileNotFoundError, match='tokenizer file not found'):
    tokenizer_lib.load(str(tmp_path / 'missing.json'))
  sp = tmp_path / 'x.model'
  sp.write_bytes(b'garbage')
  with pytest.raises(ValueError, match='not a SentencePiece model'):
    tokenizer_lib.load(str(sp))


def test_a_tokenizer_json_of_any_name_is_inherited_as_the_run_s(folder, tmp_path):
  """A fine-tune copies its tokenizer into <workdir>/tokenizer under a name that eval.py and
  generate.py look for (workdir_tokenizer_file), whatever the given file was called."""
  other = tmp_path / 'llama4_tok.json'
  other.write_text((folder / 'tokenizer.json').read_text())
  run = tmp_path / 'run'
  names = tokenizer_lib.copy_tokenizer_files(str(other), str(run / tokenizer_lib.TOKENIZER_DIR))
  assert names == ['tokenizer.json']
  found = tokenizer_lib.workdir_tokenizer_file(str(run))
  assert found == str(run / 'tokenizer' / 'tokenizer.json')
  assert tokenizer_lib.load(found).encode('The quick') == tokenizer_lib.load(str(other)).encode(
      'The quick'
  )
  # A released tokenizer.json brings its side files, under their own names.
  names = tokenizer_lib.copy_tokenizer_files(str(folder / 'tokenizer.json'), str(tmp_path / 'hf'))
  assert sorted(names) == sorted(tokenizer_lib.RELEASED_FILES)

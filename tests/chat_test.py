"""Chat data: what the loss covers, token by token; packing; bad records; the built-in task."""

import itertools
import json
import re
import runpy

import ml_collections as mlc
import numpy as np
import pytest
from PIL import Image

from llama4_jax import config_lib
from llama4_jax.data import chat, chat_task, image_text
from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib

import small_run

CONVERSATION = {
    'messages': [
        {'role': 'system', 'content': 'Answer in one word.'},
        {'role': 'user', 'content': 'Capital of Peru?'},
        {'role': 'assistant', 'content': 'Lima'},
        {'role': 'user', 'content': 'And of Norway?'},
        {'role': 'assistant', 'content': 'Oslo, of course.'},
    ]
}


@pytest.fixture(scope='module')
def tok():
  texts = [text for _, text in text_data.builtin_documents('train', 200_000)]
  return tokenizer_lib.train_tokenizer(texts, vocab_size=512)


def write_jsonl(path, records) -> str:
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
  return str(path)


def chat_config(train_files='', eval_files='', seq_len=64, batch_size=4, **data):
  config = config_lib.base_config()
  config.data.modality = 'chat'
  config.data.train_files, config.data.eval_files = train_files, eval_files
  config.data.seq_len = seq_len
  config.data.update(data)
  config.train.batch_size = config.eval.batch_size = batch_size
  config.eval.max_batches = 0
  return config


def learned_text(batch, tok) -> list[str]:
  """Per row, the targets the loss covers, decoded."""
  return [
      tok.decode(targets[weights > 0])
      for targets, weights in zip(batch['targets'], batch['weights'])
  ]


def test_the_loss_covers_the_assistant_turns_and_nothing_else(tok):
  """Token by token: weight 1 exactly on the assistant's content and its closing <|eot|>."""
  conversation = chat.parse_record(CONVERSATION, '.', 'x:1')
  ids, is_assistant = tok.chat_tokens(conversation.messages)
  assert ids == tok.format_chat(CONVERSATION['messages'], add_generation_prompt=False)
  learned = [i for i, a in zip(ids, is_assistant) if a]
  assert tok.decode(learned) == 'Lima<|eot|>Oslo, of course.<|eot|>'
  assert learned == tok.encode('Lima') + [tok.eot_id] + tok.encode('Oslo, of course.') + [
      tok.eot_id
  ]
  # In a batch: the weight of a target is whether the target is learned.
  [piece] = chat.conversation_pieces([conversation], tok, 128, 'error').pieces
  batches = text_data.packed_eval_batches(
      [piece], mlc.ConfigDict(), padding={'tokens': tok.pad_id, 'learn': 0},
      batch_size=1, seq_len=128, max_batches=0, rows=text_data.all_rows(1),
  )  # fmt: skip
  [batch] = batches
  n = len(ids)
  np.testing.assert_array_equal(batch['targets'][0, : n - 1], ids[1:])
  np.testing.assert_array_equal(batch['weights'][0, : n - 1], np.array(is_assistant[1:], float))
  assert not batch['weights'][0, n - 1 :].any()


def test_conversations_are_packed_without_crossing(tok, tmp_path):
  records = [
      {
          'messages': [
              {'role': 'user', 'content': f'Say {i}.'},
              {'role': 'assistant', 'content': f'{i}'},
          ]
      }
      for i in range(40)
  ]
  files = write_jsonl(tmp_path / 'chats.jsonl', records)
  config = chat_config(files, files, seq_len=64, batch_size=4)
  [batch, *_] = chat.make_eval_batches(config, None, tok, workdir=str(tmp_path))
  segments = batch['segment_ids']
  assert segments.max() >= 2  # several conversations per row
  answers = set()
  for row in range(len(segments)):
    for segment in set(segments[row]) - {0}:
      span = segments[row] == segment
      assert batch['positions'][row][span][0] == 0  # positions restart
      assert batch['inputs'][row][span][0] == tok.bos_id
      answers.add(tok.decode(batch['targets'][row][span & (batch['weights'][row] > 0)]))
  assert answers == {f'{i}<|eot|>' for i in range(8)}  # the first batch: 8 conversations
  # A weight never spans two conversations: the target of a segment's last input is padding
  # or the next conversation's BOS, and is never learned.
  last = (segments[:, :-1] != segments[:, 1:]) & (segments[:, :-1] > 0)
  assert not batch['weights'][:, :-1][last].any()


def test_overlong_conversations_are_cut_or_refused(tok, tmp_path):
  long = {
      'messages': [
          {'role': 'user', 'content': 'word ' * 100},
          {'role': 'assistant', 'content': 'ok'},
      ]
  }
  short = {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'ok'}]}
  path = write_jsonl(tmp_path / 'chats.jsonl', [short, long])
  conversations = chat.read_conversations(path)
  made = chat.conversation_pieces(conversations, tok, 32, 'truncate')
  assert (made.cut, made.dropped, len(made.pieces)) == (1, 1, 1)  # the cut lost its answer
  with pytest.raises(text_data.DataError, match=f'{path}:2: the conversation is .* tokens'):
    chat.conversation_pieces(conversations, tok, 32, 'error')


@pytest.mark.parametrize(
    'record, message',
    [
        ('{"messages": [', 'not valid JSON'),
        ({'text': 'hello'}, 'expected an object with a "messages" list'),
        (
            {'messages': [{'role': 'robot', 'content': 'x'}]},
            "message 0: unknown role 'robot' \\(roles: system, user, assistant\\)",
        ),
        ({'messages': [{'role': 'user', 'content': 'x'}]}, 'no assistant turn'),
        (
            {'messages': [{'role': 'user', 'content': 3}, {'role': 'assistant', 'content': 'x'}]},
            'message 0: content must be a string or a list of parts, got int',
        ),
        (
            {'messages': [{'role': 'user', 'content': [{'type': 'video'}]}]},
            'message 0: a content part must be',
        ),
        (
            {
                'messages': [
                    {'role': 'user', 'content': [{'type': 'image', 'image': 'missing.png'}]},
                    {'role': 'assistant', 'content': 'x'},
                ]
            },
            'message 0: image file .*missing.png not found',
        ),
        (
            {
                'messages': [
                    {'role': 'user', 'content': [{'type': 'image', 'image': '../../etc/x.png'}]},
                    {'role': 'assistant', 'content': 'x'},
                ]
            },
            "message 0: image path '../../etc/x.png' leaves the data folder",
        ),
    ],
)
def test_bad_records_are_named_by_file_and_line(tmp_path, record, message):
  path = write_jsonl(tmp_path / 'chats.jsonl', [CONVERSATION, record])
  with pytest.raises(text_data.DataError, match=f'^{path}:2: {message}'):
    chat.read_conversations(path)


def test_the_built_in_task_is_seeded_split_and_answerable(tmp_path):
  train = chat_task.conversations('train', 300, seed=0)
  held_out = chat_task.conversations('validation', 50, seed=0)
  assert train == chat_task.conversations('train', 300, seed=0)
  assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in held_out}
  for record in train + held_out:
    user, assistant = record['messages']
    table = user['content'].split('\n\n')[0]
    name, column = user['content'].split('\n\n')[1].rstrip('?').split(',')
    [row] = [r.split(',') for r in table.split('\n') if r.startswith(name + ',')]
    assert assistant['content'] == row[1 if column == 'age' else 2]
  task = mlc.ConfigDict(dict(dir=str(tmp_path), train_examples=30, eval_examples=5, seed=0))
  path = chat_task.write_split(task, 'validation', '')
  assert len(chat.read_conversations(path)) == 5


def test_images_in_user_turns_become_their_layout_and_tiles(tok, tmp_path):
  """A multimodal model's chat rows: each image part expands into its token layout (learned
  by no loss) and brings its tiles; the answer is still all the loss covers."""
  Image.new('RGB', (48, 48), (255, 0, 0)).save(tmp_path / 'red.png')
  record = {
      'messages': [
          {
              'role': 'user',
              'content': [
                  {'type': 'image', 'image': 'red.png'},
                  {'type': 'text', 'text': 'Colour?'},
              ],
          },
          {'role': 'assistant', 'content': 'red'},
      ]
  }
  path = write_jsonl(tmp_path / 'chats.jsonl', [record] * 3)
  config = runpy.run_path(f'{small_run.REPO}/configs/tiny_mm.py')['get_config']()
  config.data.update(modality='chat', train_files=path, eval_files=path, seq_len=96)
  config.eval.batch_size = 4
  cfg = config_lib.model_config(config)
  [batch] = chat.make_eval_batches(config, cfg, tok, workdir=str(tmp_path))
  assert batch['pixels'].shape == (4, 1, 3, 48, 48)
  assert (batch['pixels'][:3] != 0).any(axis=(1, 2, 3, 4)).all() and not batch['pixels'][3].any()
  patches = (batch['inputs'][:3] == cfg.vision.image_token_id).sum(axis=1)
  assert (patches == cfg.vision.tokens_per_tile).all()
  assert learned_text(batch, tok)[:3] == ['red<|eot|>'] * 3
  assert not batch['weights'][3].any()  # padding row
  train = chat.make_train_iterator(config, cfg, tok, workdir=str(tmp_path))
  assert next(train)['pixels'].shape == (config.train.batch_size, 1, 3, 48, 48)


def test_the_built_in_task_lives_in_a_non_local_workdir(fake_gcs):
  config = chat_config()
  config.data.chat_task.update(train_examples=20, eval_examples=4)
  conversations = chat.split_conversations(config, 'validation', 'gs://bucket/run')
  assert len(conversations) == 4
  assert fake_gcs.exists('gs://bucket/run/chat_task')


def image_chat(user: str, answer: str, images=(), text_first: bool = False) -> dict:
  """A record whose user turn has `images` (file names) before its text, or after."""
  parts = [{'type': 'image', 'image': name} for name in images]
  text = [{'type': 'text', 'text': user}]
  content = text + parts if text_first else parts + text
  return {
      'messages': [{'role': 'user', 'content': content}, {'role': 'assistant', 'content': answer}]
  }


def mm_chat_config(path, **data):
  config = runpy.run_path(f'{small_run.REPO}/configs/tiny_mm.py')['get_config']()
  config.data.update(modality='chat', train_files=path, eval_files=path, **data)
  config.eval.batch_size = config.train.batch_size = 4
  return config


def test_a_long_text_conversation_among_image_ones_is_cut(tok, tmp_path, capsys):
  """In a split with images every conversation is a row of its own, text-only ones too: one
  too long is cut (or dropped, if the cut took its answer) as in a text split."""
  Image.new('RGB', (48, 48), (255, 0, 0)).save(tmp_path / 'red.png')
  records = [
      image_chat('Colour?', 'red', ['red.png']),
      image_chat('hi', 'word ' * 100),  # cut inside the answer
      image_chat('word ' * 100, 'ok'),  # cut before the answer: dropped
  ]
  path = write_jsonl(tmp_path / 'chats.jsonl', records)
  config = mm_chat_config(path)
  cfg = config_lib.model_config(config)
  [batch] = chat.make_eval_batches(config, cfg, tok, workdir=str(tmp_path))
  assert 'chat data (validation): 2 of 3 conversations cut' in capsys.readouterr().out
  learned = learned_text(batch, tok)
  assert learned[0] == 'red<|eot|>'
  assert learned[1].startswith('word word') and not learned[1].endswith('<|eot|>')
  assert batch['segment_ids'][1].all() and not batch['pixels'][1].any()  # cut to seq_len + 1
  assert not batch['segment_ids'][2:].any()  # the dropped one: padding rows
  maker = chat._image_row_maker(config, cfg, tok)
  long_text = chat.read_conversations(path)[1]
  row = chat.image_row(long_text, maker, 'truncate')  # it raised ValueError from max()
  assert row['segment_ids'].all() and row['weights'].any()


def test_an_image_conversation_that_cannot_fit_is_named_when_the_split_is_read(tok, tmp_path):
  """Too long for data.seq_len (refused, or cut through an image), or more tiles than
  data.tiles_per_row: named with its file and line when the iterator is made, not when a
  step first draws it."""
  Image.new('RGB', (48, 48), (255, 0, 0)).save(tmp_path / 'red.png')
  short = image_chat('Colour?', 'red', ['red.png'])
  cases = {
      'error': (image_chat('word ' * 40, 'red', ['red.png']), 'with its images, longer than'),
      'truncate': (
          image_chat('word ' * 40, 'red', ['red.png'], text_first=True),
          'longer than data.seq_len \\+ 1 = 49 even when cut after its last image',
      ),
  }
  for overlong, (record, message) in cases.items():
    path = write_jsonl(tmp_path / f'{overlong}.jsonl', [short] * 4 + [record])
    config = mm_chat_config(path, chat_overlong=overlong)
    cfg = config_lib.model_config(config)
    with pytest.raises(text_data.DataError, match=f'^{path}:5: the conversation is .*{message}'):
      chat.make_train_iterator(config, cfg, tok, workdir=str(tmp_path))
    config.eval.max_batches = 1  # the 4 rows evaluated fit: the fifth is not read
    [batch] = chat.make_eval_batches(config, cfg, tok, workdir=str(tmp_path))
    assert batch['segment_ids'].any(axis=1).all()
  path = write_jsonl(tmp_path / 'two.jsonl', [short, image_chat('Both?', 'red', ['red.png'] * 2)])
  config = mm_chat_config(path)  # tiles_per_row: 1, for single-tile images
  with pytest.raises(
      text_data.DataError,
      match=f'^{path}:2: its 2 images need 2 tiles, more than data.tiles_per_row=1',
  ):
    chat.make_train_iterator(config, config_lib.model_config(config), tok, workdir=str(tmp_path))


def test_the_check_agrees_with_image_row(tok, tmp_path):
  """Conversation by conversation, the check when the split is read raises what image_row
  would (reading only image headers), and leaves out exactly the rows that learn nothing."""
  Image.new('RGB', (48, 48)).save(tmp_path / 'square.png')  # 1 tile
  Image.new('RGB', (96, 40)).save(tmp_path / 'wide.png')  # 2 tiles wide, and the global one
  turned = Image.new('RGB', (96, 40))
  exif = turned.getexif()
  exif[0x0112] = 6  # a quarter turn: loaded 40 wide, 96 high, as 2 tiles high
  turned.save(tmp_path / 'turned.jpg', exif=exif)
  config = mm_chat_config('')
  vision = config_lib.model_config(config).vision
  vision = vision.__class__(**{**vision.to_dict(), 'max_tiles': 4})
  outcomes = set()
  for tiles_per_row in (5, 2):
    maker = image_text.RowMaker(vision, tok, seq_len=100, tiles_per_row=tiles_per_row)
    for images in ([], ['square.png'], ['wide.png'], ['turned.jpg', 'square.png']):
      for words in range(0, 60, 6):
        for answer, text_first, overlong in itertools.product(
            ('ok', 'word ' * 30), (False, True), chat.OVERLONG
        ):
          record = image_chat('word ' * words, answer, images, text_first)
          conversation = chat.parse_record(record, str(tmp_path), 'chats.jsonl:1')
          try:
            row = chat.image_row(conversation, maker, overlong)
            row_outcome = 'row' if row['weights'].any() else 'nothing to learn'
          except text_data.DataError as e:
            row_outcome = str(e)
          try:
            made = chat.check_image_conversations([conversation], maker, overlong)
            check_outcome = 'row' if made.conversations else 'nothing to learn'
          except text_data.DataError as e:
            check_outcome = str(e)
          assert check_outcome == row_outcome, (tiles_per_row, images, words, answer, overlong)
          outcomes.add(re.sub(r'\d+', 'n', check_outcome.removeprefix('chats.jsonl:1: ')))
  assert outcomes == {
      'row',
      'nothing to learn',
      'the conversation is n tokens, longer than data.seq_len + n = n '
      '(set config.data.chat_overlong=truncate to cut it)',
      'the conversation is n tokens with its images, longer than data.seq_len + n = n '
      '(set config.data.chat_overlong=truncate to cut it)',
      'the conversation is n tokens with its images, longer than data.seq_len + n = n '
      'even when cut after its last image',
      'its n images need n tiles, more than data.tiles_per_row=n '
      '(raise it, or lower model.vision.max_tiles)',
      'the image needs n tiles, more than data.tiles_per_row=n '
      '(raise it, or lower model.vision.max_tiles)',
  }

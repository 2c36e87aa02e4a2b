"""Chat data: what the loss covers, token by token; packing; bad records; the built-in task."""

import json
import runpy

import ml_collections as mlc
import numpy as np
import pytest
from PIL import Image

from llama4_jax import config_lib
from llama4_jax.data import chat, chat_task
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
      batch_size=1, seq_len=128, max_batches=0, rows=slice(0, 1),
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

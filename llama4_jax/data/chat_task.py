"""The built-in chat task: questions about a small generated table, scored by exact match.

Each conversation is one user turn and the assistant's answer, for example

  user:       mia,34,oslo
              tom,27,lima
              ada,51,kyiv

              tom,city?
  assistant:  lima

Three rows of name, age and city (distinct names and cities, ages 18-89); the question asks a
person's age ("X,age?") or city ("X,city?"), drawn uniformly, and the answer is that cell:
finding the row by its first cell and copying a cell further on. The format is terse on
purpose. No cell follows a space, so a value is the same tokens in the
table, in the question and in the answer, for any BPE tokenizer that keeps a leading space
with the word after it (both kinds here do). And a conversation stays within 64 tokens (with
the tiny model's tokenizer), the tiny model's attention chunk: its RoPE layers see the whole
table when they answer. A model that copies the right cell scores 100%, one that answers from
a row at random about 33%, and a language model that has never seen the format close to 0. Conversations go to the train
or validation split by a hash of their text, so no held-out question is trained on.
Nothing is downloaded: the data are generated from a seed and written once as JSON Lines.
"""

import hashlib
import json
import os

import numpy as np
from etils import epath

NAMES = (
    'ann', 'bob', 'tom', 'sam', 'max', 'eva', 'leo', 'mia',
    'zoe', 'ian', 'amy', 'joe', 'kim', 'ben', 'ada', 'ray',
)  # fmt: skip
CITIES = (
    'oslo', 'lima', 'rome', 'bern', 'doha', 'baku', 'riga', 'kyiv',
    'lyon', 'nice', 'pisa', 'graz', 'cork', 'bonn', 'kiel', 'gent',
)  # fmt: skip
ROWS = 3
VALIDATION_PERCENT = 10
_FORMAT_VERSION = 8


def conversation(rng: np.random.Generator) -> dict:
  """One record: {"messages": [user turn, assistant answer]}."""
  names = rng.choice(NAMES, ROWS, replace=False)
  cities = rng.choice(CITIES, ROWS, replace=False)
  ages = rng.integers(18, 90, ROWS)
  table = '\n'.join(f'{n},{a},{c}' for n, a, c in zip(names, ages, cities))
  row = int(rng.integers(ROWS))
  question, answer = [
      (f'{names[row]},age?', str(ages[row])),
      (f'{names[row]},city?', str(cities[row])),
  ][int(rng.integers(2))]

  return {
      'messages': [
          {'role': 'user', 'content': f'{table}\n\n{question}'},
          {'role': 'assistant', 'content': answer},
      ]
  }


def split_of(record: dict) -> str:
  text = record['messages'][0]['content'].encode()
  key = int.from_bytes(hashlib.sha256(text).digest()[:8], 'big')
  return 'validation' if key % 100 < VALIDATION_PERCENT else 'train'


def conversations(split: str, num: int, seed: int) -> list[dict]:
  """The first `num` conversations of `split` drawn with `seed` (same arguments, same data)."""
  if split not in ('train', 'validation'):
    raise ValueError(f'Unknown split {split!r}.')
  rng, records = np.random.default_rng(seed), []
  while len(records) < num:
    record = conversation(rng)
    if split_of(record) == split:
      records.append(record)
  return records


def write_split(task_config, split: str, workdir: str) -> str:
  """Writes a split once (atomically) into data.chat_task.dir or <workdir>/chat_task; returns
  the JSON Lines file's path."""
  num = task_config.train_examples if split == 'train' else task_config.eval_examples
  folder = epath.Path(task_config.dir or os.path.join(workdir, 'chat_task'))
  path = folder / f'{split}_n{num}_seed{task_config.seed}_v{_FORMAT_VERSION}.jsonl'
  if not path.exists():
    folder.mkdir(parents=True, exist_ok=True)
    lines = ''.join(json.dumps(r) + '\n' for r in conversations(split, num, task_config.seed))
    tmp = folder / f'.{path.name}.{os.getpid()}.tmp'
    tmp.write_text(lines)
    tmp.replace(path)
  return str(path)

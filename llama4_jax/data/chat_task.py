"""The built-in chat task: questions about a small generated table, scored by exact match.

Each conversation is one user turn and the assistant's answer, for example

  user:       name,age,city
              maya,34,oslo
              omar,27,lima
              ines,51,kyiv

              age of name=omar?
  assistant:  27

Three rows of distinct names and cities, ages 18-89; the question asks a person's age
("age of name=X?"), a person's city ("city of name=X?") or who lives in a city ("name of
city=Y?"), drawn uniformly. No cell follows a space, so a value is the same tokens in the
table, in the question and in the answer, for any BPE tokenizer that keeps a leading space
with the word after it (both kinds here do). The answer is always a cell of the table: a model
that copies the right cell scores 100%, one that picks a row at random about 33%, and a
language model that has never seen the format close to 0. Conversations go to the train
or validation split by a hash of their text, so no held-out question is trained on.
Nothing is downloaded: the data are generated from a seed and written once as JSON Lines.
"""

import hashlib
import json
import os

import numpy as np
from etils import epath

NAMES = (
    'maya', 'omar', 'ines', 'liam', 'zara', 'noah', 'emma', 'ravi',
    'sofia', 'ivan', 'lena', 'kofi', 'yuki', 'hugo', 'nina', 'tariq',
)  # fmt: skip
CITIES = (
    'oslo', 'lima', 'kyiv', 'rome', 'cairo', 'quito', 'seoul', 'delhi',
    'paris', 'tokyo', 'dakar', 'hanoi', 'perth', 'minsk', 'accra', 'riga',
)  # fmt: skip
ROWS = 3
VALIDATION_PERCENT = 10
_FORMAT_VERSION = 2


def conversation(rng: np.random.Generator) -> dict:
  """One record: {"messages": [user turn, assistant answer]}."""
  names = rng.choice(NAMES, ROWS, replace=False)
  cities = rng.choice(CITIES, ROWS, replace=False)
  ages = rng.integers(18, 90, ROWS)
  table = '\n'.join(['name,age,city'] + [f'{n},{a},{c}' for n, a, c in zip(names, ages, cities)])
  row = int(rng.integers(ROWS))
  question, answer = [
      (f'age of name={names[row]}?', str(ages[row])),
      (f'city of name={names[row]}?', str(cities[row])),
      (f'name of city={cities[row]}?', str(names[row])),
  ][int(rng.integers(3))]
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

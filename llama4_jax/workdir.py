"""What a workdir holds (config.json + checkpoints/<step>/) turned back into a model."""

import jax
from flax import nnx

from llama4_jax import checkpoint, config_lib
from llama4_jax import model as model_lib
from llama4_jax import sharding


def resolve_checkpoint(workdir: str, step: int | None = None):
  """The checkpoint directory for `step` (default: the newest complete one)."""
  steps = checkpoint.all_steps(workdir)
  if not steps:
    raise FileNotFoundError(f'{checkpoint.checkpoint_root(workdir)}: no complete checkpoint')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f'{workdir}: no checkpoint for step {step}; saved steps: {steps}')
  return checkpoint.step_path(workdir, step), step


def load_params_into(model_abstract: model_lib.Llama4, path, mesh=None) -> model_lib.Llama4:
  """Loads a checkpoint's params into the (abstract) model, sharded over `mesh` if given."""
  graphdef, state = nnx.split(model_abstract)
  shardings = sharding.state_shardings(state, mesh) if mesh is not None else None
  return nnx.merge(graphdef, checkpoint.load_params_tree(path, state, shardings))


def load_model(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
               **model_overrides):
  """Returns (model, config, step) from a training or converted workdir."""
  config = config_lib.load(workdir)
  cfg = config_lib.model_config(config)
  if model_overrides:
    cfg = cfg.replace(**model_overrides)
  path, step = resolve_checkpoint(workdir, step)
  model = load_params_into(model_lib.abstract_model(cfg), path, mesh)
  return model, config, step

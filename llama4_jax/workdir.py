"""What a workdir holds (config.json + checkpoints/<step>/): its model, and whether a run may resume it."""

import jax
import ml_collections as mlc
from flax import nnx

from llama4_jax import checkpoint, config_lib, sharding
from llama4_jax import model as model_lib


def load_params_into(model_abstract: model_lib.Llama4, path, mesh=None) -> model_lib.Llama4:
  """Loads a checkpoint's params into the (abstract) model, sharded over `mesh` if given."""
  graphdef, state = nnx.split(model_abstract)
  shardings = sharding.state_shardings(state, mesh) if mesh is not None else None
  return nnx.merge(graphdef, checkpoint.load_params_tree(path, state, shardings))


def load_checkpoint(
    workdir: str, model_abstract: model_lib.Llama4, step: int | None = None, mesh=None
) -> tuple[model_lib.Llama4, int]:
  """(model, step) of checkpoint `step`, or of the newest one that can be read.

  As in training (checkpoint.TrainCheckpointer.restore_latest), a newest checkpoint that
  cannot be read is skipped with the same warning; unlike training, nothing is moved aside
  (evaluation and generation only read). A `step` asked for must be readable.
  """
  if step is not None:
    path, step = checkpoint.resolve_checkpoint(workdir, step)
    return load_params_into(model_abstract, path, mesh), step
  step, model, _ = checkpoint.read_newest(
      workdir,
      checkpoint.saved_steps(workdir),
      lambda s: load_params_into(model_abstract, checkpoint.step_path(workdir, s), mesh),
  )
  return model, step


def load_model(
    workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None, **model_overrides
):
  """Returns (model, config, step) from a training or converted workdir (`load_checkpoint`)."""
  config = config_lib.load(workdir)
  cfg = config_lib.model_config(config)
  if model_overrides:
    cfg = cfg.replace(**model_overrides)
  model, step = load_checkpoint(workdir, model_lib.abstract_model(cfg), step, mesh)
  return model, config, step


def check_resumable(config: mlc.ConfigDict, workdir: str):
  """A resumed run must have the model, the data stream and the optimizer state's structure of
  the run it resumes (config_lib.diff_model, diff_resume); say which keys differ."""
  if not config_lib.resumes(workdir):
    return
  saved = config_lib.load(workdir)
  changed = config_lib.diff_model(config, saved)
  if changed:
    details = ', '.join(
        f'model.{k}: {saved.model.get(k)} -> {config.model.get(k)}' for k in changed
    )
    raise config_lib.ConfigError(
        f'{workdir} holds checkpoints of a different model ({details}); use a new workdir or '
        f'the saved config'
    )
  changed = config_lib.diff_resume(config, saved)
  if changed:
    details = ', '.join(f'{key}: {before!r} -> {after!r}' for key, before, after in changed)
    raise config_lib.ConfigError(
        f'{workdir} holds checkpoints whose data position and optimizer state belong to other '
        f'settings ({details}); resume with the saved values, or start a new workdir from its '
        f'weights with --config.train.init_from={workdir}'
    )

"""The model a training run left in its folder, ready to use: :func:`load_trained`.

A run of ``experiments/train_nyuv2.py`` or ``experiments/train_celeba.py`` writes ``run.json`` (the flags that define
it) and ``checkpoints/`` (the state after each of its last epochs). The model is rebuilt from ``run.json`` as the script
built it, and its parameters and BatchNorm statistics are read from a checkpoint; the data and the weight files the run
read need not be at hand, and nothing in the folder changes.
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path
from typing import NamedTuple

from flax import nnx

from deep import losses, train, trainer
from deep.checkpoint import CheckpointMismatch, Checkpoints, _first_line, _looks_damaged


class TrainedModel(NamedTuple):
    """A trained model in eval mode (running BatchNorm statistics, no dropout), the epoch whose checkpoint it comes
    from, and the run's ``run.json``. ``model(images)`` gives ``(predictions, aux)``: ``predictions[task]`` is
    ``[B, H, W, C]`` for the dense tasks, a logit ``[B]`` per CelebA attribute."""

    model: nnx.Module
    epoch: int
    record: dict


def load_trained(folder: str | os.PathLike, epoch: int | None = None) -> TrainedModel:
    """The model trained by the run in ``folder``, from its newest checkpoint, or from that of ``epoch`` (the
    scripts keep the last two). Raises ``ValueError`` with one line when ``folder`` holds no run, no checkpoint or
    none of ``epoch``, or when the checkpoint cannot be read or does not match the run's model."""
    folder = Path(folder)
    if epoch is not None:
        if isinstance(epoch, bool) or not hasattr(epoch, "__index__"):
            raise ValueError(f"epoch must be an integer or None; got {epoch!r}")
        epoch = operator.index(epoch)  # NumPy's and JAX's integers too
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a run's folder (the --out of a training run)")
    try:
        record = json.loads((folder / "run.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} holds no training run: run.json is missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{folder / 'run.json'} cannot be read ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{folder / 'run.json'} is not a run's record (a JSON object)")
    directory = folder / "checkpoints"
    if not directory.is_dir():
        raise ValueError(f"{folder} holds no checkpoint (no checkpoints/ folder)")
    with Checkpoints(directory) as checkpoints:
        kept = checkpoints.epochs()
        if not kept:
            set_aside = sorted(path.name for path in directory.glob("*.unreadable*"))
            raise ValueError(f"{folder} holds no readable checkpoint: {', '.join(set_aside)} set aside as damaged"
                             if set_aside else f"{folder} holds no checkpoint yet (the run has not finished an epoch)")
        if epoch is None:
            epoch = kept[-1]
        elif epoch not in kept:
            raise ValueError(f"{folder} keeps no checkpoint of epoch {epoch}; it keeps "
                             f"{', '.join(map(str, kept))}")
        graphdef, template = _checkpointed_tree(record, folder)
        try:
            restored = checkpoints.restore(epoch, template)
        except CheckpointMismatch as error:
            raise ValueError(f"the checkpoint of epoch {epoch} in {directory} does not match the model and optimiser "
                             f"that {folder / 'run.json'} describes (another configuration's, or another version's "
                             f"of this code): {str(error).split('Orbax: ')[-1]}") from None
        except Exception as error:  # as Checkpoints.restore_latest tells damage from other failures
            if not _looks_damaged(error):
                raise
            raise ValueError(f"the checkpoint of epoch {epoch} in {directory} cannot be read ({_first_line(error)}); "
                             f"{_instead_of_damaged(epoch, kept)}") from None
    return TrainedModel(trainer.eval_model(graphdef, restored["state"]), epoch, record)


def _instead_of_damaged(epoch: int, kept: list[int]) -> str:
    """What to do about the damaged checkpoint of ``epoch``, one of those ``kept``. A resume sets aside only damaged
    checkpoints newer than the one it resumes from, so it is advice only for the newest with an older one kept."""
    older = [other for other in kept if other < epoch]
    if epoch == kept[-1] and older:
        return f"load epoch {older[-1]} instead, or resume the run, which sets the damaged one aside"
    others = [str(other) for other in kept if other != epoch]
    return f"load epoch {', '.join(others)} instead" if others else "it is the only checkpoint kept"


def _checkpointed_tree(record: dict, folder: Path) -> tuple[nnx.GraphDef, dict]:
    """``(graphdef, tree)``: the tree a run of ``record`` checkpoints, ``{"state", "balancer"}``, built as the
    scripts build it (Orbax restores into its structure, shapes and dtypes; the optimiser's settings change its
    values only), with the graph definition of its model."""
    try:
        model, tasks = _untrained_model(record)
        optimizer = train.make_optimizer(train.OptimConfig(decoupled_weight_decay=record["optimizer"] == "adamw"))
        method = record["method"]
    except KeyError as error:
        raise ValueError(f"{folder / 'run.json'} lacks the field {error}: not written by this version's "
                         f"train_nyuv2.py or train_celeba.py") from None
    except (ValueError, TypeError, AttributeError) as error:  # a value a script would have refused, or of no type
        raise ValueError(f"{folder / 'run.json'} does not describe a model: {error}") from None
    graphdef, state = train.split_model(model, optimizer)
    balancer, _ = trainer.make_step(method, graphdef, optimizer, losses.LossWeights())
    return graphdef, {"state": state, "balancer": trainer.initial_balancer_state(method, balancer, state, tasks)}


def _untrained_model(record: dict) -> tuple[nnx.Module, int]:
    """The model a run of ``record`` starts from (its configuration and seed), and its number of tasks."""
    if "attributes" in record:  # train_celeba.py
        from deep import attributes

        config = attributes.run_model_config(record)
        return attributes.AttributeModel(config, nnx.Rngs(record["seed"])), len(config.attributes)
    config = trainer.run_model_config(record)
    return trainer.build_model(config, record["architecture"], record["seed"]), len(config.tasks)

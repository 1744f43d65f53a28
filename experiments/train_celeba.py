"""Train CORE-MTL or a gradient-balancing baseline on CelebA's binary attributes, evaluating every epoch.

    python experiments/train_celeba.py --data /data/celeba --method core --pretrained resnet50.npz --augment \
        --perceptual lpips_vgg.npz                                                           # the paper's CORE-MTL
    python experiments/train_celeba.py --data /data/celeba --method pcgrad --pretrained resnet50.npz --augment
    python experiments/train_celeba.py --data /data/celeba --variant authors --attributes 10 \
        --pretrained resnet18.npz --perceptual lpips_vgg.npz --augment            # the authors' configuration
    python experiments/train_celeba.py --synthetic --model tiny --epochs 3 --warmup-epochs 1 --batch-size 8 \
        --image-size 64                                                                          # CPU smoke run
    python experiments/train_celeba.py <the run's own flags> --resume                                  # after a kill

The paper's scalability benchmark (its Table 4: T = 10, 20, 30, 40): T binary attributes of a face are T tasks
(``--attributes``: the first T of the file's 40, or comma-separated names). ``core`` trains the CelebA model of the
paper's Appendix E and the authors' code (:mod:`deep.attributes`: a 1024-channel semantic and a 64-channel residual
stream, an attribute head on the semantic stream, soft grounding through a convolutional decoder of both streams, CKA
independence; the loss weights of their ``5celeba.yaml``) on a ResNet-50 without dilation (``--variant paper``) or
the authors' ResNet-18 (``--variant authors``), with AdamW and a cosine schedule to 1e-6 over the epochs, after 5
warm-up epochs (the paper) or none (the authors' code). Any method of ``theory.balancing`` trains the same backbone
and head without the decoder, the per-attribute cross-entropies being its tasks.

``--data`` is the CelebA "Align&Cropped" folder (``img_align_celeba/``, ``list_attr_celeba.txt``,
``list_eval_partition.txt``, or Kaggle's ``.csv`` lists); ``--synthetic`` generates a small set in that layout under
``<out>/data``. Every epoch: the training losses, the attribute accuracies of the whole ``val`` split (the run's
result is its last epoch: nothing is chosen on any split), a line in ``<out>/metrics.jsonl`` and an Orbax checkpoint
written atomically; ``--resume`` continues from the newest readable checkpoint and ends where an uninterrupted run
ends. At the end, the ``test`` split is evaluated once: ``results.json``, ``curves.png``, ``attributes.png`` (each
attribute's test accuracy) and, for CORE-MTL, ``samples.png`` (faces, their reconstructions, and each face decoded
with the residual stream of another).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (environment, parse_config, parse_overrides, parser_for, pyplot, require_file,  # noqa: E402
                     require_finite, require_folder, require_integer, run_main, save_figure, write_json)
from _training import (absolute, check_full_batch, check_perceptual_weight, check_run_folder,  # noqa: E402
                       data_mesh_for, evaluation_loader, generated, last_good_state_of, read_weights, record_epoch,
                       record_run, restore_run, reused_set_note, train_epoch)

PATH_FIELDS = ("data", "pretrained", "perceptual")
VARIANTS = ("paper", "authors")
# Warm-up epochs before the cosine: the paper's Appendix F says 5 for CelebA; the authors' code has none.
DEFAULT_WARMUP_EPOCHS = {"paper": 5, "authors": 0}
PRECISIONS = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "adam")
MODELS = ("full", "tiny")


def _authors_weights():
    from deep.attributes import AttributeLossWeights

    return AttributeLossWeights()  # the authors' 5celeba.yaml


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str = dataclasses.field(default="", metadata={"help": "the CelebA folder (img_align_celeba/ and the lists)"})
    synthetic: bool = dataclasses.field(default=False, metadata={
        "help": "generate a small data set in that layout under <out>/data instead of --data"})
    attributes: str = dataclasses.field(default="40", metadata={
        "help": "the tasks: T (the first T attributes of the file, 1..40; the authors' config keeps 10) or "
                "comma-separated attribute names"})
    method: str = dataclasses.field(default="core", metadata={
        "help": "core, or a method of theory.balancing (ew, pcgrad, mgda, nash_mtl, ...) on the same backbone"})
    variant: str = dataclasses.field(default="paper", metadata={
        "help": "paper (a ResNet-50 backbone without dilation, as its Appendix E) or authors (their code's ResNet-18)"})
    model: str = dataclasses.field(default="full", metadata={
        "help": "full (the variant's ResNet) or tiny (CPU smoke runs)"})
    loss_weights: str = dataclasses.field(default="", metadata={
        "help": "for --method core: weights of the authors' objective replaced, comma-separated name=value (names: "
                "attributes, independence, appearance, appearance_l1; e.g. independence=0 for no CKA)"})
    image_size: int = dataclasses.field(default=128, metadata={"help": "faces are resized to this square size"})
    epochs: int = dataclasses.field(default=50, metadata={"help": "training epochs (the authors' 50)"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "training batch size (the authors' 256)"})
    learning_rate: float = dataclasses.field(default=2e-4, metadata={"help": "peak learning rate"})
    min_learning_rate: float = dataclasses.field(default=1e-6, metadata={
        "help": "the cosine schedule's last learning rate (the authors' eta_min)"})
    warmup_epochs: int = dataclasses.field(default=-1, metadata={
        "help": "linear warm-up epochs before the cosine (-1: the variant's, 5 as the paper says, 0 as the authors' "
                "code)"})
    weight_decay: float = dataclasses.field(default=1e-4, metadata={"help": "weight decay"})
    optimizer: str = dataclasses.field(default="adamw", metadata={
        "help": "adamw (decoupled decay: the authors' CelebA run) or adam (coupled L2)"})
    precision: str = dataclasses.field(default="float32", metadata={"help": "compute precision: float32 or "
                                                                            "bfloat16 (parameters stay float32)"})
    augment: bool = dataclasses.field(default=False, metadata={
        "help": "the authors' training augmentations: horizontal flip and colour jitter (0.1, 0.1, 0.1)"})
    on_device: bool = dataclasses.field(default=False, metadata={"help": "keep the whole data set on every device"})
    limit: int = dataclasses.field(default=0, metadata={
        "help": "keep only the first N examples of each split (0: all; for quick runs)"})
    pretrained: str = dataclasses.field(default="", metadata={
        "help": "torchvision ImageNet weights as .npz, ResNet-50 (--variant paper) or ResNet-18 (--variant authors) "
                "(see python -m deep.weights convert)"})
    perceptual: str = dataclasses.field(default="", metadata={
        "help": "LPIPS-VGG weights as .npz for CORE-MTL's perceptual reconstruction term (the authors' LPIPS; see "
                "python -m deep.perceptual convert); without it the term is left out"})
    jacobian_chunk: int = dataclasses.field(default=0, metadata={
        "help": "for the methods that take each attribute's gradient (PCGrad, MGDA, ...) and for every method's "
                "gradient probe: how many of the pull-backs through the encoder run at once (0: all; fewer hold less "
                "memory: at the paper's setting PCGrad needs about 92 GiB of temporaries at 40 attributes all at "
                "once)"})
    gradient_probe: int = dataclasses.field(default=1, metadata={
        "help": "after training, the cosines between the attributes' gradients of the shared parameters (and, for "
                "CORE-MTL, with the reconstruction's and the CKA term's), the paper's Figs. 4-5, averaged over this "
                "many training batches (0: none)"})
    steps_per_epoch: int = dataclasses.field(default=0, metadata={
        "help": "cap on training steps per epoch (0: the whole split; for smoke runs)"})
    out: str = dataclasses.field(default="results/train_celeba", metadata={"help": "output folder"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue the run in --out"})
    seed: int = dataclasses.field(default=2024, metadata={"help": "random seed (the authors' 2024)"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no progress bar or summary"})

    def __post_init__(self):
        from theory.balancing import METHODS

        if bool(self.data) == self.synthetic:
            raise ValueError("give exactly one of --data PATH and --synthetic")
        choices = {"--method": (self.method, ("core", *sorted(METHODS))), "--model": (self.model, MODELS),
                   "--variant": (self.variant, VARIANTS),
                   "--precision": (self.precision, PRECISIONS), "--optimizer": (self.optimizer, OPTIMIZERS)}
        for option, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
        warmup_given = self.warmup_epochs != -1
        if not warmup_given:  # frozen: the variant's default filled in once, so the run records what it trains with
            object.__setattr__(self, "warmup_epochs", DEFAULT_WARMUP_EPOCHS[self.variant])
        for name, least in (("seed", 0), ("image_size", 32), ("epochs", 1), ("batch_size", 1), ("limit", 0),
                            ("steps_per_epoch", 0), ("warmup_epochs", 0), ("gradient_probe", 0),
                            ("jacobian_chunk", 0)):
            require_integer(self, name, least)
        if self.warmup_epochs >= self.epochs:
            default = "" if warmup_given else f" (the {self.variant} variant's: pass a smaller --warmup-epochs)"
            raise ValueError(f"--warmup-epochs must be smaller than --epochs ({self.epochs}); got "
                             f"{self.warmup_epochs}{default}")
        require_finite(self, "learning_rate")
        require_finite(self, "min_learning_rate", positive=False)
        require_finite(self, "weight_decay", positive=False)
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(f"--min-learning-rate must be at most --learning-rate ({self.learning_rate}); got "
                             f"{self.min_learning_rate}")
        require_file("--pretrained", self.pretrained)
        require_file("--perceptual", self.perceptual)
        if self.perceptual and self.method != "core":
            raise ValueError(f"--perceptual is for --method core (its reconstruction loss); got --method "
                             f"{self.method}")
        require_folder("--data", self.data)
        self.attribute_names  # validates --attributes
        # Frozen: the overrides recorded in one spelling, so that the same weights are the same run.
        object.__setattr__(self, "loss_weights", parse_overrides("--loss-weights", self.loss_weights,
                                                                 _authors_weights())[1])
        if self.loss_weights and self.method != "core":
            raise ValueError(f"--loss-weights is for --method core (its objective); got --method {self.method}")
        check_perceptual_weight(self.perceptual, self.weights.appearance)

    @property
    def weights(self):
        """CORE-MTL's loss weights: the authors' (``5celeba.yaml``), with ``--loss-weights`` replacing some."""
        return parse_overrides("--loss-weights", self.loss_weights, _authors_weights())[0]

    @property
    def attribute_names(self) -> tuple[str, ...]:
        from deep.data import resolve_attributes

        text = self.attributes.strip()
        selection = int(text) if text.isdigit() else [name.strip() for name in text.split(",")]
        try:
            return resolve_attributes(selection)
        except ValueError as error:
            raise ValueError(f"--attributes: {error}") from None

    def model_config(self):
        from deep.attributes import run_model_config

        return run_model_config({**dataclasses.asdict(self), "attributes": self.attribute_names})

    def run_identity(self) -> dict:
        """The fields that define the training run: a resumed run must agree on all of them (not the probe that
        follows it)."""
        identity = {k: v for k, v in dataclasses.asdict(self).items()
                    if k not in ("resume", "quiet", "out", "gradient_probe")}
        identity["attributes"] = list(self.attribute_names)  # "10" and the ten names are the same run
        identity.update({k: absolute(identity[k]) for k in PATH_FIELDS})
        return identity


def _load_splits(config: TrainConfig, out: Path, progress) -> dict[str, dict]:
    """``{"train", "val", "test"}`` arrays (uint8 images); ``--synthetic`` first writes a generated set under
    ``<out>/data`` with at least one full batch of training examples."""
    from deep import data

    root = Path(config.data) if config.data else out / "data"
    if config.synthetic:
        generated(root, lambda folder: data.write_celeba(folder, train=max(64, config.batch_size), val=16, test=16,
                                                         seed=config.seed))
    size = (config.image_size, config.image_size)
    return {split: data.load_celeba(root, split, config.attribute_names, size=size, limit=config.limit or None,
                                    progress=progress)
            for split in ("train", "val", "test")}


def _plot_curves(history: list[dict], path: Path) -> None:
    plt = pyplot()

    epochs = [line["epoch"] for line in history]
    figure, (losses_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(7.5, 3))
    names = sorted({k for line in history for k in line["train"]
                    if not k.startswith("weight/") and ("/" in k or k in ("loss", "attributes", "independence"))
                    or k.startswith("appearance")})
    for name in names:
        losses_axis.plot(epochs, [line["train"].get(name, float("nan")) for line in history], label=name)
    losses_axis.set(title="training losses (epoch means)", xlabel="epoch", yscale="log")
    losses_axis.legend(fontsize=6)
    accuracy_axis.plot(epochs, [line["val"]["attributes/mean_accuracy"] for line in history], marker=".")
    accuracy_axis.set(title="val: mean attribute accuracy", xlabel="epoch")
    figure.tight_layout()
    save_figure(figure, path)


def _plot_attributes(test: dict, attributes: Sequence[str], path: Path) -> None:
    plt = pyplot()

    values = [test[f"attributes/{name}"] for name in attributes]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.22 * len(attributes) + 1.5), 3.2))
    axis.bar(range(len(attributes)), values)
    axis.axhline(test["attributes/mean_accuracy"], color="k", lw=0.8, ls="--", label="mean")
    axis.set_xticks(range(len(attributes)), attributes, rotation=90, fontsize=6)
    axis.set(ylabel="test accuracy", ylim=(min(0.5, min(values)), 1.0))
    axis.legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, path)


def _plot_samples(images, panels: dict, path: Path) -> None:
    plt = pyplot()
    import numpy as np

    columns = [("face", images), ("reconstruction", panels["reconstruction"]),
               ("with the previous face's ẑ_r", panels["swapped"])]
    figure, axes = plt.subplots(len(images), len(columns), figsize=(1.8 * len(columns), 1.8 * len(images)),
                                squeeze=False)
    for column, (title, values) in enumerate(columns):
        for row in range(len(images)):
            axes[row, column].imshow(np.clip(np.asarray(values[row]), 0, 1))
            axes[row, column].set_xticks([]), axes[row, column].set_yticks([])
            if row == 0:
                axes[row, column].set_title(title, fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def _gradient_summary(cosines: dict) -> dict[str, float]:
    """Mean |cos| between two attributes' gradients (off the diagonal), and between the attributes' gradients and
    each grounding term's."""
    import numpy as np

    task_task = np.asarray(cosines["task_task"])
    off_diagonal = ~np.eye(len(task_task), dtype=bool)
    summary = {"mean_abs_task_task": float(np.abs(task_task[off_diagonal]).mean()) if off_diagonal.any() else 0.0}
    for name in ("task_reconstruction", "task_independence"):
        if name in cosines:
            summary[f"mean_abs_{name}"] = float(np.abs(np.asarray(cosines[name])).mean())
    return summary


def _plot_gradients(cosines: dict, attributes: Sequence[str], path: Path) -> None:
    plt = pyplot()
    import numpy as np

    grounded = "task_reconstruction" in cosines
    figure, axes = plt.subplots(1, 2 if grounded else 1, figsize=(9.5 if grounded else 5, 4.2), squeeze=False)
    count = len(attributes)  # numbered from 1 in the file's order, as the paper's Appendix K numbers them
    image = axes[0, 0].imshow(np.asarray(cosines["task_task"]), cmap="RdBu_r", vmin=-1, vmax=1,
                              extent=(0.5, count + 0.5, count + 0.5, 0.5))
    axes[0, 0].set(title="cos between attributes' gradients", xlabel="attribute", ylabel="attribute")
    figure.colorbar(image, ax=axes[0, 0], fraction=0.046)
    if grounded:
        positions = np.arange(len(attributes))
        for offset, name in ((-0.2, "task_reconstruction"), (0.2, "task_independence")):
            axes[0, 1].bar(positions + offset, np.asarray(cosines[name]), width=0.4, label=name.split("_")[1])
        axes[0, 1].axhline(0, color="k", lw=0.6)
        axes[0, 1].set_xticks(positions, attributes, rotation=90, fontsize=6)
        axes[0, 1].set(title="cos with the grounding terms' gradients", ylim=(-1, 1))
        axes[0, 1].legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(TrainConfig, parser_for(TrainConfig, __doc__.splitlines()[0], prog="train_celeba.py"),
                          argv, out_kind="folder")
    from deep import devices

    devices.initialize_distributed()  # before anything asks JAX for its devices
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from deep import attributes, train, trainer
    from deep.checkpoint import Checkpoints
    from deep.data import AugmentConfig, Loader, augment
    from deep.perceptual import load_lpips_npz
    from deep.weights import load_torchvision_npz

    out = Path(config.out)
    checkpoints_dir = out / "checkpoints"
    resumed = check_run_folder(out, config.run_identity(), config.resume, TrainConfig, PATH_FIELDS,
                               "train_celeba.py")
    mesh = data_mesh_for(config.batch_size)
    primary = jax.process_index() == 0

    # Closed (and, leave=False, cleared) also when reading stops with an error, so only its one line is left.
    with tqdm(desc="reading CelebA", unit="image", disable=config.quiet, leave=False, file=sys.stderr) as reading:
        splits = _load_splits(config, out, reading.update)
    check_full_batch(config.batch_size, len(splits["train"]["images"]), mesh.devices.size,
                     reused_set_note(out / "data") if config.synthetic else "")
    placement = {"on_device": config.on_device, "mesh": mesh if config.on_device else None}
    loader = Loader(splits["train"], config.batch_size, seed=config.seed, **placement)

    # Built once (with --on-device each holds a copy of its split on every device); the last batch's filler rows
    # are unlabelled (-1, skipped by the metric).
    evaluation_loaders = {split: evaluation_loader(splits[split], config.batch_size, config.seed, placement)
                          for split in ("val", "test")}

    def evaluation_batches(split: str):
        for batch in evaluation_loaders[split].epoch(0):
            batch = devices.place_batch(mesh, batch)
            yield {**batch, "images": as_float(batch["images"])}

    steps_per_epoch = min(len(loader), config.steps_per_epoch) if config.steps_per_epoch else len(loader)
    optimizer = train.make_optimizer(train.OptimConfig(
        learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        decoupled_weight_decay=config.optimizer == "adamw", epochs=config.epochs, warmup_epochs=config.warmup_epochs,
        steps_per_epoch=steps_per_epoch, min_lr_ratio=config.min_learning_rate / config.learning_rate))
    model_config = config.model_config()
    model = attributes.AttributeModel(model_config, nnx.Rngs(config.seed))
    if config.pretrained:
        read_weights("--pretrained", load_torchvision_npz, model, config.pretrained)
    graphdef, state = train.split_model(model, optimizer)
    perceptual = read_weights("--perceptual", load_lpips_npz, config.perceptual) if config.perceptual else None
    perceptual = devices.replicate(mesh, perceptual)
    jacobian_chunk = config.jacobian_chunk or None
    loss_weights = config.weights
    balancer, step = attributes.make_attribute_step(config.method, graphdef, optimizer, loss_weights, perceptual,
                                                    jacobian_chunk)
    balancer_state = trainer.initial_balancer_state(config.method, balancer, state, len(model_config.attributes))
    record_run(out, config.run_identity(), {split: len(splits[split]["images"]) for split in ("train", "val", "test")},
               resumed)  # once every input (data, weight files) has been read
    state, balancer_state = devices.replicate(mesh, (state, balancer_state))
    predict = attributes.predict_logits_function(graphdef)
    as_float = jax.jit(lambda images: images.astype(jnp.float32) / 255.0)
    augment_config = AugmentConfig(scales=(1.0,), color_jitter=(0.1, 0.1, 0.1, 0.0))
    augment_images = jax.jit(lambda key, images: augment(key, {"images": images}, augment_config)["images"])

    with Checkpoints(checkpoints_dir) as checkpoints:
        start_epoch, restored, history = restore_run(
            checkpoints, {"state": state, "balancer": balancer_state}, config.resume, "train_celeba.py",
            out / "metrics.jsonl", config.epochs, config.quiet)
        state, balancer_state = restored["state"], restored["balancer"]
        base_key = jax.random.key(config.seed)
        started = time.time()
        last_good_state = functools.partial(last_good_state_of, checkpoints, checkpoints_dir)

        for epoch in range(start_epoch, config.epochs):
            epoch_start = time.time()

            def dispatched_steps():
                nonlocal state, balancer_state
                for index, batch in enumerate(loader.epoch(epoch)):
                    if index == steps_per_epoch:
                        break
                    step_key, augment_key = jax.random.split(jax.random.fold_in(base_key, epoch * steps_per_epoch
                                                                                + index))
                    batch = devices.shard_batch(mesh, batch)
                    images = as_float(batch["images"])
                    if config.augment:
                        images = augment_images(augment_key, images)
                    state, balancer_state, metrics = step(state, balancer_state, {**batch, "images": images},
                                                          step_key)
                    yield index, metrics

            sums, count = train_epoch(dispatched_steps(), steps_per_epoch, epoch, config.epochs, config.quiet,
                                      ("loss", "attributes"), last_good_state)
            train_seconds = time.time() - epoch_start
            line = {"epoch": epoch + 1, "devices": int(mesh.devices.size),
                    "train": {k: v / count for k, v in sums.items()},
                    "val": attributes.evaluate_attributes(predict, state, evaluation_batches("val"),
                                                          model_config.attributes),
                    "train_seconds": train_seconds, "images_per_second": count * config.batch_size / train_seconds}
            record_epoch(line, history, ("val",), out, primary, checkpoints,
                         {"state": state, "balancer": balancer_state}, last_good_state)
            if not config.quiet:
                print(f"epoch {epoch + 1}: loss {line['train']['loss']:.4g}; val mean accuracy "
                      f"{line['val']['attributes/mean_accuracy']:.4f}", file=sys.stderr)

    # The test split, once, for the final model (the run's result is its last epoch; nothing was chosen on it).
    test = attributes.evaluate_attributes(predict, state, evaluation_batches("test"), model_config.attributes)
    written = ["results.json", "curves.png", "attributes.png"]
    if primary:
        _plot_curves(history, out / "curves.png")
        _plot_attributes(test, model_config.attributes, out / "attributes.png")
    if config.method == "core":
        images = np.asarray(splits["test"]["images"][:4], np.float32) / 255.0
        panels = attributes.sample_panels(graphdef, state, devices.replicate(mesh, images))
        if primary:
            _plot_samples(images, panels, out / "samples.png")
        written.append("samples.png")
    if config.gradient_probe:
        probe = jax.jit(functools.partial(attributes.gradient_cosines, graphdef, weights=loss_weights,
                                          jacobian_chunk=jacobian_chunk))
        sums = None
        # Batches of an epoch after the last (fixed by the seed), unaugmented: full batches, no filler rows.
        for index, batch in enumerate(loader.epoch(config.epochs)):
            if index == config.gradient_probe:
                break
            batch = devices.shard_batch(mesh, batch)
            probes = jax.device_get(probe(state, {**batch, "images": as_float(batch["images"])},
                                          perceptual=perceptual))
            sums = probes if sums is None else jax.tree.map(np.add, sums, probes)
        probe_batches = min(config.gradient_probe, len(loader))
        cosines = jax.tree.map(lambda total: total / probe_batches, sums)
        gradient_summary = _gradient_summary(cosines)
        if primary:
            _plot_gradients(cosines, model_config.attributes, out / "gradients.png")
        written.append("gradients.png")
    results = {"experiment": "train_celeba", "config": dataclasses.asdict(config),
               "model": dataclasses.asdict(model_config),
               "loss_weights": dataclasses.asdict(loss_weights) if config.method == "core" else None,
               "final_val": history[-1]["val"], "test": test, "epochs": len(history), "history": history,
               **({"gradient_cosines": {"batches": probe_batches, **gradient_summary,
                                        **{k: np.asarray(v).tolist() for k, v in cosines.items()}}}
                  if config.gradient_probe else {}),
               "seconds_this_process": time.time() - started, "environment": environment()}
    if primary:
        write_json(out / "results.json", results)
    if not config.quiet:
        print(f"test mean attribute accuracy: {test['attributes/mean_accuracy']:.4f} (val, last epoch: "
              f"{history[-1]['val']['attributes/mean_accuracy']:.4f})")
        print(f"wrote {', '.join(f'{out}/{name}' for name in written)}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""Train CORE-MTL or a gradient-balancing baseline on NYUv2, Cityscapes or an OOD shift, evaluating every epoch.

    python experiments/train_nyuv2.py --data /data/nyuv2 --method core --pretrained resnet50.npz --augment  # paper
    python experiments/train_nyuv2.py --data /data/nyuv2 --method pcgrad --augment                 # a baseline
    python experiments/train_nyuv2.py --data /data/nyuv2 --method stl --task depth --augment       # a Δ baseline
    python experiments/train_nyuv2.py --data /data/cityscapes --dataset cityscapes --augment \
        --corruptions paper                                                    # Cityscapes-C, after training
    python experiments/train_nyuv2.py --data /data/gta5/train --dataset gta5 --target-data /data/cityscapes \
        --source-data /data/gta5/val --augment                                # GTA5 -> Cityscapes
    python experiments/train_nyuv2.py --data /data/cityscapes --dataset colored_cityscapes --augment  # stress test
    python experiments/train_nyuv2.py --synthetic --model tiny --epochs 7 --warmup-epochs 1 --batch-size 4  # CPU
    python experiments/train_nyuv2.py <the run's own flags> --resume                            # after a kill

``--resume`` takes the run's own flags again (``--out`` included) and refuses any training flag that differs
(``--corruptions``, ``--severities`` and ``--quiet`` may: they do not change the training).

``--data`` is a folder in the LibMTL/MTAN layout (``train`` and ``val`` with ``image``, ``label``, ``depth`` and
``normal`` subfolders of ``<i>.npy``); ``--synthetic`` generates a small set in that layout under ``<out>/data``.
Methods: ``core`` (the dual-stream model with hard grounding, the authors' stages, CKA ramp and counterfactual pass),
``stl`` (one task, for the Δp/Δm baselines), or any method of ``theory.balancing`` on the same backbone and heads,
with hard parameter sharing or ``--architecture mtan``. ``--dataset cityscapes`` trains on LibMTL's Cityscapes (7
classes and disparity); ``--dataset gta5`` trains on GTA5 (``images/``, ``labels/``, ``depth/``, mapped onto the same
7 classes) and evaluates on the val split of the Cityscapes folder ``--target-data``: the paper's GTA5→Cityscapes
shift; ``--source-data`` adds a held-out GTA5 folder, evaluated beside it, for the source metrics and the target −
source gap (``final_source``, ``source_target_gap``). ``--dataset colored_cityscapes`` is the paper's stress test
(:mod:`deep.data.colored`): Cityscapes recoloured by class for training and the source metrics, its val split with
the class colours permuted as the target, scored the same way. ``--corruptions`` evaluates the final model once
more on the val split corrupted in code (:func:`deep.data.corrupt`) by each named corruption at each of
``--severities`` (``paper``: the four the paper reports on Cityscapes-C; ``all``: ten); the results go to
``results.json`` (``corrupted``, ``corrupted_mean``) and ``corruptions.png``.

Every epoch: the training losses, the metrics of the whole ``val`` split (NYUv2's test split: it is only reported, never
used to choose anything — the run's result is its last epoch) and of ``--source-data`` (under ``source``), a line in
``<out>/metrics.jsonl`` and an Orbax checkpoint written atomically. ``--resume`` continues from the newest readable
checkpoint and ends where an uninterrupted run with the same flags ends: batches, augmentations, keys and the
counterfactual coin flips depend only on the seed, the epoch and the step. At the end: ``results.json``, ``curves.png``
(losses and metrics per epoch) and ``samples.png`` (image, labels, predictions, and for CORE-MTL the rendered
reconstruction and a counterfactual with a swapped residual code).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (environment, flag, parse_choices, parse_config, parse_overrides, parser_for, pyplot,  # noqa: E402
                     require_file, require_finite, require_folder, require_integer, run_main, save_figure, write_json)
from _training import (absolute, check_full_batch, check_perceptual_weight, check_run_folder,  # noqa: E402
                       data_mesh_for, evaluation_loader, generated, last_good_state_of, read_weights, record_epoch,
                       record_run, restore_run, reused_set_note, train_epoch)

DATASETS = ("nyuv2", "cityscapes", "gta5", "colored_cityscapes")
# What --augment does per dataset, as AugmentConfig fields: the authors' NYUv2 and GTA5 pipelines; Cityscapes is
# flipped only, as the paper's Appendix F says (the authors' code trains it unaugmented; its depth is a disparity:
# marked so, should a zoom ever be added).
AUGMENTATIONS = {"nyuv2": {}, "gta5": {"scales": (1.0,), "color_jitter": (0, 0, 0, 0)},
                 "cityscapes": {"scales": (1.0,), "color_jitter": (0, 0, 0, 0), "depth_is_disparity": True}}
AUGMENTATIONS["colored_cityscapes"] = AUGMENTATIONS["cityscapes"]  # a flip keeps each class's colour
# The loss weights a dataset trains with unless --preset says otherwise (the paper's Table 7).
DEFAULT_PRESETS = {"nyuv2": "nyuv2", "cityscapes": "cityscapes", "gta5": "gta5_to_cityscapes",
                   "colored_cityscapes": "cityscapes"}
# The batch size and warm-up a dataset trains with unless the flags say otherwise (the paper's Appendix F; its
# Cityscapes-C runs, the cityscapes_c preset, take batches of 16, as the authors' configuration for them).
DEFAULT_BATCH_SIZES = {"nyuv2": 16, "cityscapes": 32, "gta5": 32, "colored_cityscapes": 32}
CITYSCAPES_C_BATCH_SIZE = 16
DEFAULT_WARMUP_EPOCHS = {"nyuv2": 5, "cityscapes": 5, "gta5": 10, "colored_cityscapes": 5}
# The flags that name files or folders: a resumed run compares them as absolute paths.
PATH_FIELDS = ("data", "target_data", "source_data", "pretrained", "perceptual")
PRECISIONS = ("float32", "bfloat16")
OPTIMIZERS = ("adam", "adamw")
GROUNDINGS = ("hard", "soft")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str = dataclasses.field(default="", metadata={"help": "data folder in the LibMTL layout"})
    synthetic: bool = dataclasses.field(default=False, metadata={
        "help": "generate a small data set in that layout under <out>/data instead of --data"})
    dataset: str = dataclasses.field(default="nyuv2", metadata={
        "help": "nyuv2, cityscapes, gta5 (train on GTA5, evaluate on Cityscapes' val split: --target-data, "
                "and on held-out GTA5 scenes: --source-data), or colored_cityscapes (the paper's stress test: "
                "Cityscapes with one colour per class, evaluated with the colours permuted; --data is Cityscapes)"})
    shortcut_strength: float = dataclasses.field(default=1.0, metadata={
        "help": "for --dataset colored_cityscapes: how much of each pixel's colour is its class's, in [0, 1] "
                "(0: the images unchanged; 1: colour alone tells the class)"})
    target_data: str = dataclasses.field(default="", metadata={
        "help": "for --dataset gta5: the Cityscapes folder (LibMTL layout) whose val split is the OOD target"})
    source_data: str = dataclasses.field(default="", metadata={
        "help": "for --dataset gta5: a held-out GTA5 folder (the GTA5 layout), evaluated every epoch beside the "
                "target, for the source metrics and the target - source gap (the paper's Table 2)"})
    method: str = dataclasses.field(default="core", metadata={
        "help": "core, stl, or a method of theory.balancing (ew, pcgrad, mgda, nash_mtl, ...)"})
    task: str = dataclasses.field(default="", metadata={
        "help": "the task of an stl run: segmentation, depth or normal (Cityscapes and GTA5 have no normal)"})
    architecture: str = dataclasses.field(default="shared", metadata={
        "help": "the baselines' architecture: shared (hard parameter sharing) or mtan (task attention)"})
    grounding: str = dataclasses.field(default="hard", metadata={
        "help": "CORE-MTL's grounding: hard (the physical renderer plus the generic decoders, as the authors run "
                "it) or soft (the generic geometry and AdaIN appearance decoders only, Eq 15)"})
    variant: str = dataclasses.field(default="paper", metadata={
        "help": "the architecture: paper (heads read only the semantic stream of c4) or authors (their code: "
                "multi-scale fusion of c1..c4, DeepLabV3+ heads that also read the fused features and a c1 skip)"})
    heads_read: str = dataclasses.field(default="", metadata={
        "help": "override the variant's head input: semantic (the paper) or semantic+backbone (the authors)"})
    preset: str = dataclasses.field(default="", metadata={
        "help": "loss weights of the paper's Table 7: nyuv2, cityscapes, gta5_to_cityscapes, cityscapes_c "
                "(default: the dataset's)"})
    loss_weights: str = dataclasses.field(default="", metadata={
        "help": "for --method core: weights of the preset replaced, comma-separated name=value, for the paper's "
                "ablations (independence=0: no CKA; counterfactual=0: no counterfactual term; see the README for "
                "removing the grounding); the names are deep.losses.LossWeights' fields"})
    model: str = dataclasses.field(default="full", metadata={
        "help": "full (ResNet-50, the paper's), reduced or tiny (CPU smoke runs)"})
    semantic_channels: int = dataclasses.field(default=0, metadata={
        "help": "channels of the semantic stream (0: the model's, 512 in the full one; the authors' GTA5 and "
                "Cityscapes-C configurations use 1024)"})
    residual_channels: int = dataclasses.field(default=0, metadata={
        "help": "channels of the residual stream (0: the model's, 256 in the full one; the authors' GTA5 and "
                "Cityscapes-C configurations use 64)"})
    epochs: int = dataclasses.field(default=100, metadata={"help": "training epochs"})
    batch_size: int = dataclasses.field(default=0, metadata={
        "help": "training batch size (0: the paper's for the dataset, 16 on NYUv2 and 32 on Cityscapes and GTA5, "
                "16 with the cityscapes_c preset)"})
    learning_rate: float = dataclasses.field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = dataclasses.field(default=1e-4, metadata={"help": "weight decay"})
    optimizer: str = dataclasses.field(default="adam", metadata={
        "help": "adam (coupled L2, the authors' code) or adamw (decoupled, as the paper says)"})
    warmup_epochs: int = dataclasses.field(default=-1, metadata={
        "help": "linear warm-up epochs before the cosine (-1: the paper's for the dataset, 10 on GTA5 and 5 on the "
                "others)"})
    precision: str = dataclasses.field(default="float32", metadata={"help": "compute precision: float32 or "
                                                                            "bfloat16 (parameters stay float32)"})
    augment: bool = dataclasses.field(default=False, metadata={
        "help": "training augmentations, which the paper's runs use: NYUv2 random scale-crop, flip and colour "
                "jitter (the authors' pipeline); GTA5 and Cityscapes flip (the paper's Appendix F; the authors' "
                "code does not augment Cityscapes)"})
    on_device: bool = dataclasses.field(default=False, metadata={"help": "keep the whole data set on every device"})
    pretrained: str = dataclasses.field(default="", metadata={
        "help": "torchvision ResNet-50 ImageNet weights as .npz (see python -m deep.weights convert)"})
    corruptions: str = dataclasses.field(default="", metadata={
        "help": "after training, evaluate the val split under these corruptions: 'paper' (the four the paper "
                "reports on Cityscapes-C: contrast, defocus_blur, fog, gaussian_noise), 'all' (ten) or "
                "comma-separated names"})
    severities: str = dataclasses.field(default="1,2,3,4,5", metadata={
        "help": "the corruption severities to evaluate, comma-separated, each in 1..5"})
    perceptual: str = dataclasses.field(default="", metadata={
        "help": "LPIPS-VGG weights as .npz for CORE-MTL's perceptual reconstruction term, the authors' LPIPS (see "
                "python -m deep.perceptual convert); without it the term is left out"})
    steps_per_epoch: int = dataclasses.field(default=0, metadata={
        "help": "cap on training steps per epoch (0: the whole split; for smoke runs)"})
    out: str = dataclasses.field(default="results/train_nyuv2", metadata={"help": "output folder"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue the run in --out"})
    seed: int = dataclasses.field(default=2024, metadata={"help": "random seed (the authors' 2024)"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no progress bar or summary"})

    def __post_init__(self):
        from deep import losses
        from deep.model import HEAD_INPUTS, VARIANTS
        from deep.trainer import ARCHITECTURES, MODEL_SIZES
        from theory.balancing import METHODS

        if bool(self.data) == self.synthetic:
            raise ValueError("give exactly one of --data PATH and --synthetic")
        choices = {"--dataset": (self.dataset, DATASETS), "--precision": (self.precision, PRECISIONS),
                   "--optimizer": (self.optimizer, OPTIMIZERS), "--grounding": (self.grounding, GROUNDINGS),
                   "--variant": (self.variant, tuple(VARIANTS)), "--model": (self.model, tuple(MODEL_SIZES)),
                   "--method": (self.method, ("core", "stl", *sorted(METHODS)))}
        if self.preset:
            choices["--preset"] = (self.preset, tuple(losses.PRESETS))
        if self.heads_read:
            choices["--heads-read"] = (self.heads_read, HEAD_INPUTS)
        for option, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
        # Frozen dataclass: the dataset's defaults are filled in once, so the run records what it trains with.
        warmup_given = self.warmup_epochs != -1
        if self.batch_size == 0:
            object.__setattr__(self, "batch_size", CITYSCAPES_C_BATCH_SIZE if self.weights_preset == "cityscapes_c"
                               else DEFAULT_BATCH_SIZES[self.dataset])
        if self.warmup_epochs == -1:
            object.__setattr__(self, "warmup_epochs", DEFAULT_WARMUP_EPOCHS[self.dataset])
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"--architecture must be one of {', '.join(ARCHITECTURES)}; got {self.architecture!r}")
        if self.architecture == "mtan" and self.variant != "paper":
            raise ValueError(f"--variant {self.variant} builds the dual-stream model; --architecture mtan has its own "
                             f"heads (use --variant paper)")
        # Flags the chosen model would ignore are refused, as --loss-weights for a baseline is: the run's record (and
        # a --resume) would claim a run it did not train. Given at their defaults they change nothing.
        if self.grounding != "hard" and self.method != "core":
            raise ValueError(f"--grounding is for --method core (the baselines' models have no decoders); got "
                             f"--method {self.method}")
        ignored_by_mtan = [flag(name) for name in ("semantic_channels", "residual_channels", "heads_read")
                           if getattr(self, name)]
        if self.architecture == "mtan" and ignored_by_mtan:
            raise ValueError(f"{', '.join(ignored_by_mtan)} set the dual-stream model's streams and heads; "
                             f"--architecture mtan has neither (leave them out)")
        if self.architecture == "mtan" and self.method in ("core", "graddrop"):
            needs = ("the dual-stream model" if self.method == "core" else
                     "hard parameter sharing (it masks the gradients of the one shared representation)")
            raise ValueError(f"--architecture mtan trains the balancing baselines; --method {self.method} needs "
                             f"{needs}: --architecture shared")
        # No head reads the residual stream: only CORE-MTL's decoders and CKA term do, so a baseline's trains nothing
        # and its width changes no prediction (the stream shift that would show it is measured for core alone).
        if self.residual_channels and self.method != "core":
            raise ValueError(f"--residual-channels is for --method core (no head reads the residual stream; only its "
                             f"decoders and CKA term do); got --method {self.method}")
        if not 0.0 <= self.shortcut_strength <= 1.0:
            raise ValueError(f"--shortcut-strength must lie in [0, 1]; got {self.shortcut_strength}")
        if self.shortcut_strength != 1.0 and self.dataset != "colored_cityscapes":
            raise ValueError(f"--shortcut-strength is for --dataset colored_cityscapes only; got --dataset "
                             f"{self.dataset}")
        if self.task and self.method != "stl":
            raise ValueError(f"--task is for --method stl only; got --method {self.method}")
        for name, least in (("seed", 0),  # numpy's generators (the loader's) refuse < 0
                            ("semantic_channels", 0), ("residual_channels", 0), ("epochs", 1), ("batch_size", 1),
                            ("warmup_epochs", 0), ("steps_per_epoch", 0)):
            require_integer(self, name, least)
        if self.warmup_epochs >= self.epochs:
            default = "" if warmup_given else f" (the paper's for {self.dataset}: pass a smaller --warmup-epochs)"
            raise ValueError(f"--warmup-epochs must be smaller than --epochs ({self.epochs}); got "
                             f"{self.warmup_epochs}{default}")
        # Frozen: the overrides recorded in one spelling, so that the same weights are the same run.
        object.__setattr__(self, "loss_weights", parse_overrides("--loss-weights", self.loss_weights,
                                                                 losses.PRESETS[self.weights_preset])[1])
        if self.loss_weights and self.method != "core":
            raise ValueError(f"--loss-weights is for --method core (its objective); got --method {self.method}")
        stage0 = self.weights.stage0_epochs
        if self.method == "core" and self.epochs <= stage0:
            changed = " with --loss-weights" if self.loss_weights else ""
            raise ValueError(f"--method core trains only the reconstruction, task heads frozen, for its first "
                             f"{stage0} epochs (stage 0 of the {self.weights_preset} preset{changed}): --epochs must "
                             f"exceed {stage0} for the heads to train; got {self.epochs}")
        require_finite(self, "learning_rate")
        require_finite(self, "weight_decay", positive=False)
        require_file("--pretrained", self.pretrained)
        require_file("--perceptual", self.perceptual)
        if self.perceptual and self.method != "core":
            raise ValueError(f"--perceptual is for --method core (its reconstruction loss); got --method "
                             f"{self.method}")
        check_perceptual_weight(self.perceptual, self.weights.appearance)
        require_folder("--data", self.data)
        for option, path in (("--target-data", self.target_data), ("--source-data", self.source_data)):
            if path and self.dataset != "gta5":
                raise ValueError(f"{option} is for --dataset gta5 only; got --dataset {self.dataset}")
            require_folder(option, path)
        if self.dataset == "gta5" and self.data and not self.target_data:
            raise ValueError("--dataset gta5 needs --target-data PATH: the Cityscapes folder it is evaluated on")
        if self.source_data and self.data and absolute(self.source_data) == absolute(self.data):
            raise ValueError("--source-data must be a held-out GTA5 folder, not the training folder --data")
        self.corruption_names  # validates --corruptions and --severities
        self.severity_levels
        if self.severities != type(self).severities and not self.corruptions:  # the class attribute: its default
            raise ValueError(f"--severities is for --corruptions (the severities each corruption is evaluated at); "
                             f"got --severities {self.severities} without --corruptions")
        self.model_config()  # the model's own checks (a head that needs features the variant does not give...)

    def model_config(self):
        from deep import trainer

        return trainer.run_model_config(dataclasses.asdict(self))

    @property
    def corruption_names(self) -> tuple[str, ...]:
        from deep.data import CORRUPTIONS, PAPER_CORRUPTIONS

        if not self.corruptions:
            return ()
        return parse_choices("--corruptions", self.corruptions, CORRUPTIONS, {"paper": PAPER_CORRUPTIONS})

    @property
    def severity_levels(self) -> tuple[int, ...]:
        levels = tuple(dict.fromkeys(part.strip() for part in self.severities.split(",")))
        if not levels or any(level not in ("1", "2", "3", "4", "5") for level in levels):
            raise ValueError(f"--severities must be comma-separated integers in 1..5; got {self.severities!r}")
        return tuple(int(level) for level in levels)

    @property
    def weights_preset(self) -> str:
        return self.preset or DEFAULT_PRESETS[self.dataset]

    @property
    def weights(self):
        """CORE-MTL's loss weights: the preset's, with ``--loss-weights`` replacing some."""
        from deep import losses

        return parse_overrides("--loss-weights", self.loss_weights, losses.PRESETS[self.weights_preset])[0]

    def run_identity(self) -> dict:
        """The fields that define the training run: a resumed run must agree on all of them. Not the evaluation
        under corruption, which a finished run can add with ``--resume --corruptions ...``; ``heads_read``
        resolved (empty means the variant's)."""
        identity = {k: v for k, v in dataclasses.asdict(self).items()
                    if k not in ("resume", "quiet", "out", "corruptions", "severities")}
        identity["heads_read"] = self.model_config().heads_read
        identity.update({k: absolute(identity[k]) for k in PATH_FIELDS})
        return identity


# ---------------------------------------------------------------------------------------------------- data


def _load_splits(config: TrainConfig, out: Path) -> tuple[dict, dict, dict | None]:
    """``(train, test, source_test)`` arrays: the dataset's train and val splits (no source split), or for ``gta5``
    all of GTA5 (resized to the target's size), Cityscapes' val split and, with ``--source-data``, the held-out GTA5
    folder; for ``colored_cityscapes`` Cityscapes' train split in the source colours, its val split in the permuted
    ones (the target) and in the source ones. ``--synthetic`` first writes generated sets under ``<out>/data`` (for
    ``gta5`` a held-out one too), with at least one full batch of training examples."""
    from deep import data
    from deep.data.colored import colored_cityscapes

    training_examples = max(8, config.batch_size)

    if config.dataset == "gta5":
        root = Path(config.data) if config.data else out / "data" / "gta5"
        target_root = Path(config.target_data) if config.target_data else out / "data" / "cityscapes"
        source_root = Path(config.source_data) if config.source_data else (
            out / "data" / "gta5_val" if config.synthetic else None)
        if config.synthetic:
            # Other seeds for the target (another city) and the held-out source scenes.
            generated(target_root, lambda folder: data.write_cityscapes(folder, seed=config.seed + 1))
            generated(root, lambda folder: data.write_gta5(folder, count=training_examples, seed=config.seed))
            generated(source_root, lambda folder: data.write_gta5(folder, count=4, seed=config.seed + 2))
        test = data.load_cityscapes(target_root, "val")
        size = test["images"].shape[1:3]
        source = data.load_gta5(source_root, size=size) if source_root else None
        return data.load_gta5(root, size=size), test, source
    root = Path(config.data) if config.data else out / "data"
    if config.synthetic:
        writer = data.write_nyuv2 if config.dataset == "nyuv2" else data.write_cityscapes
        generated(root, lambda folder: writer(folder, train=training_examples, seed=config.seed))
    load = data.load_nyuv2 if config.dataset == "nyuv2" else data.load_cityscapes
    if config.dataset == "nyuv2" and not (root / "train" / "normal").is_dir() and (root / "train" / "depth").is_dir():
        raise FileNotFoundError(f"--data: {root} has no train/normal folder, as LibMTL's Cityscapes has none: for "
                                f"Cityscapes give --dataset cityscapes (or colored_cityscapes); NYUv2 needs normals")
    if config.dataset == "colored_cityscapes":
        # The source colours for training and the source metrics, the permuted ones for the target (the result).
        return colored_cityscapes(load(root, "train"), load(root, "val"), config.shortcut_strength)
    return load(root, "train"), load(root, "val"), None


# ------------------------------------------------------------------------------------------------- logging


def _stream_shift(graphdef, state, key, batches, count: int, source_batches=None) -> dict:
    """:func:`deep.trainer.stream_shift` of the final model over the test split: ``appearance``, each image against
    its colour-jittered copy (:data:`deep.trainer.PROBE_JITTER`, one fixed draw per image from ``key``), and for
    Colored-Cityscapes ``colors_permuted``, each val image in the source colours against the same image in the
    permuted ones (``source_batches``)."""
    import jax

    from deep import trainer
    from deep.data import color_jitter

    jitter = jax.jit(jax.vmap(lambda image_key, image: color_jitter(image_key, image, trainer.PROBE_JITTER)))

    def jittered():
        for index, batch in enumerate(batches()):
            images = batch["images"]
            yield images, jitter(jax.random.split(jax.random.fold_in(key, index), images.shape[0]), images)

    shifts = {"appearance": trainer.stream_shift(graphdef, state, jittered(), count)}
    if source_batches is not None:
        pairs = ((source["images"], target["images"]) for source, target in zip(source_batches(), batches()))
        shifts["colors_permuted"] = trainer.stream_shift(graphdef, state, pairs, count)
    return shifts


def _estimate(stats: dict, key: str = "mean") -> str:
    value, error = stats[key], stats["standard_error"]
    if value is None:
        return "n/a"
    return f"{value:.3g}" + (f" ± {error:.2g}" if error is not None else "")


def _earlier_corruption_results(path: Path) -> dict:
    """The corruption results of the ``results.json`` at ``path`` ({} when it has none or cannot be read)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(earlier, dict):
        return {}
    return {k: earlier[k] for k in ("corrupted", "corrupted_mean") if k in earlier}


def _plot_curves(history: list[dict], path: Path) -> None:
    plt = pyplot()

    epochs = [line["epoch"] for line in history]
    loss_names = sorted({k for line in history for k in line["train"] if not k.startswith("weight/")
                         and k != "finite"})
    metric_names = sorted({k for line in history for k in line["test"]})
    figure, axes = plt.subplots(1, 1 + len(metric_names), figsize=(3.2 * (1 + len(metric_names)), 3), squeeze=False)
    for name in loss_names:
        axes[0, 0].plot(epochs, [line["train"].get(name, float("nan")) for line in history], label=name)
    axes[0, 0].set(title="training losses (epoch means)", xlabel="epoch", yscale="log")
    axes[0, 0].legend(fontsize=6)
    # GTA5 with held-out source scenes, beside the test split, which is then the target; a line written before a
    # resume by an older version may lack them.
    with_source = any("source" in line for line in history)
    for axis, name in zip(axes[0, 1:], metric_names):
        axis.plot(epochs, [line["test"][name] for line in history], marker=".",
                  label="target" if with_source else "test")
        if with_source:
            axis.plot(epochs, [line.get("source", {}).get(name, float("nan")) for line in history], marker=".",
                      ls="--", label="source")
            axis.legend(fontsize=6)
        axis.set(title=name, xlabel="epoch")
    figure.tight_layout()
    save_figure(figure, path)


def _plot_corruptions(clean: dict, corrupted: dict, path: Path) -> None:
    """One panel per task's headline metric against severity (0 = clean), one line per corruption."""
    plt = pyplot()

    headline = [name for name in ("segmentation/miou", "depth/abs_err", "normal/mean") if name in clean]
    figure, axes = plt.subplots(1, len(headline), figsize=(3.6 * len(headline), 3), squeeze=False)
    for axis, name in zip(axes[0], headline):
        for corruption, by_severity in corrupted.items():
            severities = sorted(by_severity, key=int)
            axis.plot([0, *map(int, severities)], [clean[name], *(by_severity[s][name] for s in severities)],
                      marker=".", label=corruption)
        axis.set(title=name, xlabel="severity (0 = clean)")
    axes[0, 0].legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, path)


def _plot_samples(batch: dict, panels: dict, path: Path) -> None:
    plt = pyplot()
    import numpy as np

    # The labels of the tasks the batch holds (a single-task run's test split holds one), each beside its prediction.
    columns = [("image", batch["images"], "rgb")]
    if "segmentation" in batch:
        columns += [("labels", batch["segmentation"], "seg"),
                    ("predicted segmentation", panels["pred/segmentation"].argmax(-1), "seg")
                    if "pred/segmentation" in panels else None]
    if "depth" in batch:
        columns += [("depth", batch["depth"][..., 0], "depth"),
                    ("predicted depth", panels["pred/depth"][..., 0], "depth") if "pred/depth" in panels else None]
    if "normal" in batch:
        columns += [("normals", batch["normal"], "normal"),
                    ("predicted normals", panels["pred/normal"], "normal") if "pred/normal" in panels else None]
    if "rendered" in panels:
        columns.append(("rendered (hard grounding)", panels["rendered"], "rgb"))
    if "reconstruction" in panels:
        columns.append(("appearance decoder", panels["reconstruction"], "rgb"))
    if "counterfactual" in panels:
        columns.append(("counterfactual: next image's ẑ_r", panels["counterfactual"], "rgb"))
    columns = [c for c in columns if c is not None]
    rows = len(batch["images"])
    figure, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 1.8 * rows), squeeze=False)
    for column, (title, values, kind) in enumerate(columns):
        for row in range(rows):
            value = np.asarray(values[row])
            axis = axes[row, column]
            if kind == "rgb":
                axis.imshow(np.clip(value, 0, 1))
            elif kind == "normal":
                axis.imshow(np.clip(0.5 * (value + 1), 0, 1))
            elif kind == "seg":
                axis.imshow(np.ma.masked_less(value, 0), cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
            else:
                axis.imshow(np.ma.masked_less_equal(value, 0), cmap="viridis")
            axis.set_xticks([]), axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(TrainConfig, parser_for(TrainConfig, __doc__.splitlines()[0], prog="train_nyuv2.py"),
                          argv, out_kind="folder")
    from deep import devices, train

    devices.initialize_distributed()  # before anything asks JAX for its devices
    import jax
    import numpy as np
    from tqdm import tqdm

    from deep import trainer
    from deep.checkpoint import Checkpoints
    from deep.data import AugmentConfig, Loader, augment
    from deep.perceptual import load_lpips_npz
    from deep.weights import load_torchvision_npz

    out = Path(config.out)
    checkpoints_dir = out / "checkpoints"
    resumed = check_run_folder(out, config.run_identity(), config.resume, TrainConfig, PATH_FIELDS,
                               "train_nyuv2.py")
    mesh = data_mesh_for(config.batch_size)
    primary = jax.process_index() == 0  # the one process that writes files other than checkpoints

    train_split, test_split, source_split = _load_splits(config, out)
    model_config = config.model_config()
    task_names = [name for name, _ in model_config.tasks]
    keep = ["images", *task_names]
    tasks_only = lambda split: {k: v for k, v in split.items() if k in keep}  # noqa: E731
    train_split, test_split = tasks_only(train_split), tasks_only(test_split)
    source_split = tasks_only(source_split) if source_split is not None else None
    check_full_batch(config.batch_size, len(train_split["images"]), mesh.devices.size,
                     reused_set_note(out / "data") if config.synthetic else "")
    # On the device: a copy of each split on every device, each batch gathered there already split over them.
    placement = {"on_device": config.on_device, "mesh": mesh if config.on_device else None}
    loader = Loader(train_split, config.batch_size, seed=config.seed, **placement)

    test_loader = evaluation_loader(test_split, config.batch_size, config.seed, placement)
    # A source split (GTA5's held-out scenes, Colored-Cityscapes' source colours): evaluated beside the target.
    source_loader = (evaluation_loader(source_split, config.batch_size, config.seed, placement)
                     if source_split is not None else None)
    steps_per_epoch = min(len(loader), config.steps_per_epoch) if config.steps_per_epoch else len(loader)

    weights = config.weights
    if config.method == "core" and not config.quiet:
        for term in trainer.unused_terms(weights, config.epochs):
            print(f"train_nyuv2.py: warning: no epoch of {config.epochs} trains {term}: the {config.weights_preset} "
                  f"preset's schedule starts it later (its stage0_epochs, stage1_epochs, counterfactual_start_epoch), "
                  f"so this run is the same as one with it at 0", file=sys.stderr)
    optim = train.OptimConfig(learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                              decoupled_weight_decay=config.optimizer == "adamw", epochs=config.epochs,
                              warmup_epochs=config.warmup_epochs, steps_per_epoch=steps_per_epoch)
    optimizer = train.make_optimizer(optim)
    model = trainer.build_model(model_config, config.architecture, config.seed)
    if config.pretrained:
        read_weights("--pretrained", load_torchvision_npz, model, config.pretrained)
    graphdef, state = train.split_model(model, optimizer)
    perceptual = read_weights("--perceptual", load_lpips_npz, config.perceptual) if config.perceptual else None
    # On every device once: passed to each step, weights on one device would be copied to the others every step.
    perceptual = devices.replicate(mesh, perceptual)
    balancer, step = trainer.make_step(config.method, graphdef, optimizer, weights, perceptual)
    balancer_state = trainer.initial_balancer_state(config.method, balancer, state, len(task_names))
    sizes = {"train": len(train_split["images"]), "test": len(test_split["images"])}
    if source_split is not None:
        sizes["source"] = len(source_split["images"])
    record_run(out, config.run_identity(), sizes, resumed)  # once every input (data, weight files) has been read
    # Replicated before a restore too, which then lays the restored arrays out as these.
    state, balancer_state = devices.replicate(mesh, (state, balancer_state))
    predict = trainer.predict_function(graphdef)
    augment_config = AugmentConfig(**AUGMENTATIONS[config.dataset])
    augment_batch = jax.jit(lambda key, batch: augment(key, batch, augment_config))

    def test_batches(loader=test_loader):
        return trainer.placed_for_evaluation(mesh, loader.epoch(0))

    # Closed on the way out, also when training stops with an error, so Orbax's background machinery ends cleanly.
    with Checkpoints(checkpoints_dir) as checkpoints:
        start_epoch, restored, history = restore_run(
            checkpoints, {"state": state, "balancer": balancer_state}, config.resume, "train_nyuv2.py",
            out / "metrics.jsonl", config.epochs, config.quiet)
        state, balancer_state = restored["state"], restored["balancer"]
        finished_before = start_epoch == config.epochs  # resumed once done: the final model is the earlier one
        base_key = jax.random.key(config.seed)
        started = time.time()

        last_good_state = functools.partial(last_good_state_of, checkpoints, checkpoints_dir)

        for epoch in range(start_epoch, config.epochs):
            controls = trainer.EpochControls.at(weights, epoch) if config.method == "core" else None
            epoch_start = time.time()

            def dispatched_steps():
                """Takes the epoch's steps, yielding each one's index and metrics as soon as it is dispatched."""
                nonlocal state, balancer_state
                for index, batch in enumerate(loader.epoch(epoch)):
                    if index == steps_per_epoch:
                        break
                    global_step = epoch * steps_per_epoch + index
                    step_key, augment_key = jax.random.split(jax.random.fold_in(base_key, global_step))
                    batch = devices.shard_batch(mesh, batch)
                    if config.augment:
                        batch = augment_batch(augment_key, batch)
                    counterfactual = controls is not None and controls.counterfactual_at(config.seed, global_step)
                    state, balancer_state, metrics = step(state, balancer_state, batch, step_key, controls,
                                                          counterfactual)
                    yield index, metrics

            # While the device runs a step, the host gathers, transfers and augments the next batch.
            sums, count = train_epoch(dispatched_steps(), steps_per_epoch, epoch, config.epochs, config.quiet,
                                      ("loss", *task_names), last_good_state)
            train_seconds = time.time() - epoch_start
            test_metrics = trainer.evaluate(predict, state, test_batches(), model_config.tasks)
            line = {"epoch": epoch + 1, "devices": int(mesh.devices.size),
                    "train": {k: v / count for k, v in sums.items()}, "test": test_metrics,
                    "train_seconds": train_seconds, "images_per_second": count * config.batch_size / train_seconds}
            if source_loader is not None:
                line["source"] = trainer.evaluate(predict, state, test_batches(source_loader), model_config.tasks)
            record_epoch(line, history, ("test", "source"), out, primary, checkpoints,
                         {"state": state, "balancer": balancer_state}, last_good_state)
            if not config.quiet:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in test_metrics.items())
                print(f"epoch {epoch + 1}: loss {line['train']['loss']:.4g}; test {shown}", file=sys.stderr)

    sample_batch = {k: np.asarray(v[:4]) for k, v in test_split.items()}
    panels = trainer.sample_panels(graphdef, state, devices.replicate(mesh, sample_batch["images"]))
    if primary:
        _plot_samples(sample_batch, panels, out / "samples.png")
        _plot_curves(history, out / "curves.png")
    results = {"experiment": "train_nyuv2", "config": dataclasses.asdict(config),
               "model": dataclasses.asdict(model_config), "loss_weights_preset": config.weights_preset,
               "loss_weights": dataclasses.asdict(weights) if config.method == "core" else None,
               "final": history[-1]["test"], "epochs": len(history),
               "history": history}
    if source_loader is not None:
        # The paper's Table 2: source and target metrics and their gap (target - source; for errors, a positive gap
        # is a loss of accuracy out of distribution, for mIoU and pixel accuracy a negative one).
        results["final_source"] = history[-1]["source"]
        results["source_target_gap"] = {name: value - history[-1]["source"][name]
                                        for name, value in history[-1]["test"].items()}
    if config.method == "core":
        # How far each stream moves under an appearance change that keeps the content (the paper's Table 3 claim).
        source_batches = (lambda: test_batches(source_loader)) if config.dataset == "colored_cityscapes" else None
        results["stream_shift"] = _stream_shift(graphdef, state, jax.random.split(base_key, 3)[2], test_batches,
                                                len(test_split["images"]), source_batches)
    written = ["results.json", "curves.png", "samples.png"]
    if config.corruption_names:
        passes = tqdm(total=len(config.corruption_names) * len(config.severity_levels), desc="corrupted val",
                      disable=config.quiet, leave=False, file=sys.stderr)
        corrupted = trainer.evaluate_corrupted(
            predict, state, test_batches, model_config.tasks, config.corruption_names,
            config.severity_levels, jax.random.split(base_key)[1], progress=passes.update)  # no step's key
        passes.close()
        results["corrupted"] = corrupted
        results["corrupted_mean"] = {name: float(np.mean([metrics[name] for by_severity in corrupted.values()
                                                          for metrics in by_severity.values()]))
                                     for name in history[-1]["test"]}
        if primary:
            _plot_corruptions(history[-1]["test"], corrupted, out / "corruptions.png")
        written.append("corruptions.png")
    elif finished_before:
        # Resumed once finished, without --corruptions: the model is the one an earlier pass evaluated under
        # corruption, so those results stay (after more training they would describe an older model, and go).
        results.update(_earlier_corruption_results(out / "results.json"))
        if "corrupted" in results:
            results["corrupted_note"] = "from an earlier --resume --corruptions pass over this same final model"
    results.update(seconds_this_process=time.time() - started, environment=environment())
    if primary:
        write_json(out / "results.json", results)
    if not config.quiet:
        print(f"final test metrics: {json.dumps(history[-1]['test'])}")
        if source_loader is not None:
            print(f"final source metrics: {json.dumps(results['final_source'])}")
        if config.corruption_names:
            print(f"mean under corruption: {json.dumps(results['corrupted_mean'])}")
        for name, shift in results.get("stream_shift", {}).items():
            ratio = shift["ratio"]
            print(f"stream shift ({name}): semantic {_estimate(shift['semantic'])}, residual "
                  f"{_estimate(shift['residual'])}, ratio {_estimate(ratio, 'ratio')}")
        print(f"wrote {', '.join(f'{out}/{name}' for name in written)}")
    return 0


if __name__ == "__main__":
    run_main(main)

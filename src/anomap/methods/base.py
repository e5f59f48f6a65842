"""What every method is to the rest of anomap: a network with a training loss,
an anomaly map, an image score, and a recipe that says how to train it.

The training loop, evaluation, reports and export only ever talk to this
contract, so a new method is one new file in this folder.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from typing import Annotated, Any, ClassVar, get_args, get_origin

import torch
from torch import nn

from anomap.orientation import check_orientation
from anomap.scoring import IMAGE_SCORES, check_score_options, image_score

SELECTION_RULES = ("val_score", "val_map_mean", "last", "synthetic")
#: the paper presets of methods with pretrained teachers name the papers' networks;
#: ``paper-lite`` is the same recipe with the offline EfficientNet-Lite teachers
PAPER, PAPER_LITE = "paper", "paper-lite"
#: share of the normal images held out by default (selection and calibration)
DEFAULT_HOLDOUT = 0.2


@dataclass(frozen=True)
class Opt:
    """What a method's constructor parameter means to users, in its annotation:
    ``strides: Annotated[list[int], Opt("pyramid levels")] = (4, 8, 16)``. The typed
    signature is the one declaration of a method's options: their names, types and
    defaults come from it; CLI flags, ``retune``, docs/cli.md and reports from this."""

    help: str
    choices: tuple[str, ...] | None = None
    #: changes how a trained map is read, not what is learnt: ``anomap retune`` may change it
    inference: bool = False
    #: names pretrained weights to load; a saved run's checkpoint holds them, so they are
    #: set to None when it is loaded
    pretrained: bool = False
    metavar: str | None = None


@dataclass(frozen=True)
class OptionSpec:
    """One declared option: name, default, value type, and its :class:`Opt`."""

    name: str
    default: Any
    kind: type  # int, float, str or bool
    many: bool  # a list of ``kind``
    opt: Opt


def _spec(name: str, parameter: inspect.Parameter) -> OptionSpec | None:
    annotation = parameter.annotation
    if get_origin(annotation) is not Annotated:
        return None
    base, *extras = get_args(annotation)
    opt = next((e for e in extras if isinstance(e, Opt)), None)
    if opt is None:
        return None
    kinds = [a for a in (get_args(base) or (base,)) if a is not type(None)]
    many = False
    for candidate in kinds:
        if get_origin(candidate) in (list, tuple):
            many, kinds = True, [get_args(candidate)[0]]
            break
    default = parameter.default
    if isinstance(default, tuple):
        default = list(default)
    return OptionSpec(name, default, kinds[0], many, opt)


# Options several methods share, declared once.
BackboneName = Annotated[str, Opt("feature network: efficientnet_lite0 (offline), _lite1, "
                                  "_lite2, resnet18", metavar="NAME")]
TeacherWeights = Annotated[str | None, Opt("teacher weights: imagenet or a .pth file",
                                           pretrained=True, metavar="W")]
Strides = Annotated[tuple[int, ...] | list[int], Opt("pyramid levels (MTD: 8 16 32)",
                                                     metavar="S")]
ScoreWindow = Annotated[int, Opt("image score = max of the map's KxK means (odd)",
                                 inference=True, metavar="K")]
ImageScoreRule = Annotated[str, Opt("max: the hottest window; mean: of the whole map",
                                    choices=IMAGE_SCORES, inference=True)]
AnomalySourceName = Annotated[str | None, Opt(
    "textures pasted as synthetic anomalies: a folder (e.g. DTD), builtin, procedural, "
    "skimage", metavar="SRC")]
AnomalyShare = Annotated[float, Opt("share of training images given a synthetic anomaly",
                                    metavar="P")]


def _about(text: str, **kwargs: Any) -> Any:
    """A recipe field with its help text, which ``anomap train``'s flags show."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class Recipe:
    """How a method is trained by default; every field can be overridden, from
    Python or as ``anomap train --<field>`` (the help below is the flag's)."""

    epochs: int = _about("training epochs", default=100)
    batch_size: int = _about("images per step", default=32)
    image_size: int = _about("network input side in pixels", default=256)
    optimizer: str = _about("sgd, adam or adamw", default="sgd")
    lr: float = _about("learning rate", default=0.4)
    momentum: float = _about("SGD momentum", default=0.9)
    weight_decay: float = _about("L2 penalty (AdamW: decoupled)", default=1e-4)
    lr_milestones: tuple[float, ...] = _about(
        "fractions of the epochs where lr is multiplied by --lr-gamma", default=())
    lr_gamma: float = _about("lr factor at a milestone", default=0.1)
    # --model auto trains a candidate in steps along its preset's whole schedule, so
    # that its last step is the preset's recipe, not restarts of shorter schedules.
    schedule_epochs: int = _about(
        "epochs the lr milestones are fractions of; 0: --epochs (set it above --epochs "
        "to stop part way along a longer schedule and --resume along it)", default=0)
    # Which epoch's weights become model.pt, judged on held-out normals only.
    selection: str = _about(
        "kept epoch: val_score (lowest mean held-out image score), val_map_mean (lowest "
        "mean held-out map, STPM's code), last, synthetic (best on synthetic anomalies)",
        default="val_score")
    augment: str = _about("none, flip, dihedral: random flips / right-angle turns",
                          default="none")
    epoch_samples: int = _about(
        "samples per epoch: the images repeated to this many (FractalAD's 391); "
        "0: one pass over the images", default=0)
    drop_last: bool = _about("skip an epoch's last, smaller batch", default=False)
    color_jitter: float = _about(
        "brightness, contrast, saturation and hue jitter of each training image "
        "(FractalAD's 0.05); 0: none", default=0.0)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.selection not in SELECTION_RULES:
            raise ValueError(f"unknown selection {self.selection!r}: "
                             f"{', '.join(SELECTION_RULES)}")
        check_orientation(self.augment)
        if self.epoch_samples < 0:
            raise ValueError(f"epoch_samples must be 0 (one pass) or more, got "
                             f"{self.epoch_samples}")
        if self.schedule_epochs < 0:
            raise ValueError(f"schedule_epochs must be 0 (--epochs) or more, got "
                             f"{self.schedule_epochs}")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ValueError(f"color_jitter must lie in [0, 1], got {self.color_jitter}")

    @classmethod
    def settable(cls) -> dict[str, tuple[Any, str]]:
        """Every field a user may set: name -> (default, help)."""
        return {f.name: (f.default, f.metadata["help"]) for f in fields(cls)
                if "help" in f.metadata}

    def updated(self, **overrides: Any) -> Recipe:
        """A copy with the non-None overrides applied (unknown names are an error)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}; known: {sorted(known)}")
        values = asdict(self)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["lr_milestones"] = tuple(values["lr_milestones"])
        return Recipe(**values)


@dataclass(frozen=True)
class Preset:
    """A named starting point: a recipe, the constructor options and the way of
    reading maps that were measured together, and when to use it."""

    recipe: Recipe
    config: dict[str, Any] = field(default_factory=dict)
    map_normalization: str = "none"
    use: str = ""
    #: share of the normal images held out to select the epoch and set the threshold;
    #: 0: train on all of them (the official DRAEM and FractalAD code), calibrate on
    #: the training images (docs/usage.md says what that costs)
    holdout: float = DEFAULT_HOLDOUT


class AnomalyModel(nn.Module):
    """Base class of the methods.

    Inputs are always float images in [0, 1], shape (B, 3, S, S); a method
    applies whatever normalisation its networks expect.
    """

    name: ClassVar[str] = ""
    #: training time per image relative to STPM's, roughly: ``--model auto`` tries the
    #: cheaper candidates first
    relative_cost: ClassVar[float] = 1.0

    def __init__(self, score_window: ScoreWindow = 1, image_score: ImageScoreRule = "max",
                 **config: Any) -> None:
        super().__init__()
        config.update(score_window=score_window, image_score=image_score)
        unknown = sorted(set(config) - set(type(self).options()))
        if unknown:
            raise ValueError(f"{self.name} has no option {', '.join(unknown)}; its options: "
                             f"{', '.join(type(self).options())}")
        check_score_options(config)
        self.config: dict[str, Any] = dict(config)

    @classmethod
    @cache
    def options(cls) -> dict[str, OptionSpec]:
        """The method's options, read from its constructors' annotated signatures (a
        constructor that passes ``**config`` on inherits its parent's)."""
        found: dict[str, OptionSpec] = {}
        for klass in cls.__mro__:
            if "__init__" not in vars(klass) or not issubclass(klass, AnomalyModel):
                continue
            signature = inspect.signature(klass.__init__, eval_str=True)
            for name, parameter in list(signature.parameters.items())[1:]:
                spec = _spec(name, parameter)
                if spec is not None and name not in found:
                    found[name] = spec
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD
                       for p in signature.parameters.values()):
                break
        return found

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """Constructor arguments the method uses when the user gives none."""
        return {name: spec.default for name, spec in cls.options().items()}

    @classmethod
    def inference_options(cls) -> tuple[str, ...]:
        """Options ``anomap retune`` may change on a trained run."""
        return tuple(name for name, spec in cls.options().items() if spec.opt.inference)

    @classmethod
    def pretrained_options(cls) -> tuple[str, ...]:
        return tuple(name for name, spec in cls.options().items() if spec.opt.pretrained)

    @classmethod
    def default_recipe(cls) -> Recipe:
        return Recipe()

    @classmethod
    def presets(cls) -> dict[str, Preset]:
        """Named starting points. ``paper`` is the faithful setting; a method with
        pretrained teachers adds ``paper-lite`` (the same with the offline teachers),
        a method too heavy for a CPU a measured ``cpu`` one, and a method may add
        others measured for a kind of data."""
        return {PAPER: Preset(cls.default_recipe(), use="the paper's recipe")}

    @classmethod
    def teacher_presets(cls, recipe: Recipe, papers: dict[str, Any],
                        config: dict[str, Any] | None = None, holdout: float = DEFAULT_HOLDOUT
                        ) -> dict[str, Preset]:
        """``paper`` with the papers' teachers (``papers``: their backbone options) and
        ``paper-lite``, the same recipe and ``config`` with the offline EfficientNet-Lite
        teachers (the options' defaults)."""
        named = ", ".join(str(v) for k, v in papers.items() if k.endswith("backbone"))
        config = config or {}
        return {PAPER: Preset(recipe, {**config, **papers}, holdout=holdout,
                              use=f"the paper's recipe and teachers ({named}; their "
                                  "ImageNet weights from a file, docs/usage.md)"),
                PAPER_LITE: Preset(recipe, dict(config), holdout=holdout,
                                   use="the paper's recipe with the offline EfficientNet-Lite "
                                       "teachers")}

    @classmethod
    def teachers_found(cls, preset: str) -> bool:
        """Whether the ImageNet weights ``preset``'s teachers need are on this machine."""
        from anomap.backbones import imagenet_available

        config = {**cls.default_config(), **cls.presets()[preset].config}
        for backbone, weights in (("backbone", "weights"), ("second_backbone", "second_weights")):
            if backbone in config and config.get(weights) == "imagenet" \
                    and not imagenet_available(config[backbone]):
                return False
        return True

    @classmethod
    def resolve_preset(cls, name: str, device_type: str) -> str:
        """``auto``: the ``cpu`` setting on a CPU where the method has one, else
        ``paper``, or ``paper-lite`` when the paper's teachers' weights are not here."""
        available = cls.presets()
        if name == "auto":
            if device_type != "cuda" and "cpu" in available:
                return "cpu"
            if PAPER_LITE in available and not cls.teachers_found(PAPER):
                return PAPER_LITE
            return PAPER
        if name not in available:
            choices = "; ".join(f"{key} ({preset.use})" for key, preset in available.items())
            raise ValueError(f"{cls.name} has no preset {name!r}; available: auto (cpu on a "
                             f"CPU where there is one, else paper, or paper-lite without the "
                             f"paper's teacher weights); {choices}")
        return name

    @classmethod
    def synthetic_kinds(cls, config: dict[str, Any]) -> set[str]:
        """The kinds of synthetic anomaly (:data:`anomap.synth.kinds.KINDS`) the method
        trains on with these options: ``--model auto`` never judges it on them."""
        return set()

    @classmethod
    def describe_options(cls, config: dict[str, Any]) -> list[str]:
        """Short phrases for reports and tables: the options that change this model's
        numbers (its backbone, the method's own, how the map is scored)."""
        parts = [str(config.get("backbone") or "")] if "backbone" in cls.options() else []
        parts += cls.option_phrases(config)
        if config.get("image_score", "max") == "mean":
            parts.append("image score = map mean")
        elif config.get("score_window", 1) != 1:
            parts.append(f"score window {config['score_window']}")
        return [part for part in parts if part]

    @classmethod
    def option_phrases(cls, config: dict[str, Any]) -> list[str]:
        """The method's own phrases for :meth:`describe_options`."""
        return []

    def write_training_samples(self, images: torch.Tensor, path: Any, n: int = 8) -> Any:
        """A picture of what the method trains on (methods with synthetic anomalies)."""
        raise ValueError(f"{self.name} trains on the normal images as they are: "
                         "there are no synthetic samples to show")

    def decide_from_data(self, images: torch.Tensor) -> dict[str, tuple[Any, str]]:
        """Settle ``auto`` options from a sample of the normal training images, once,
        before training: ``{option: (value, why)}``, which the caller records in the
        run's config and tells the user. Most methods have none."""
        return {}

    def frozen_targets(self, images: torch.Tensor) -> list[torch.Tensor] | None:
        """What the method's frozen networks make of training images as loaded,
        or None. A method whose loss compares against a frozen network on
        unaltered images returns them: they are the same every epoch, so the
        loop computes them once per run and passes them back to
        ``training_loss`` (STPM's teacher pass is 15-25% of a training step)."""
        return None

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        """Losses for one batch of normal images; key ``loss`` is minimised.
        ``targets``: this batch's ``frozen_targets``, when the loop has them."""
        raise NotImplementedError

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, S, S) map, higher = more anomalous."""
        raise NotImplementedError

    def memorize(self, batches: Iterable[torch.Tensor], count: int, seed: int = 0) -> None:
        """For a method with no trainable parameters: learn from one pass over the
        ``count`` training images in ``batches`` (PatchCore's memory bank)."""
        raise NotImplementedError(f"{self.name} learns by gradient")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def finish_training(self, images: torch.Tensor, *, device: torch.device, seed: int,
                        progress: bool = False) -> list[dict[str, float]]:
        """A second stage, trained after the loop on the kept epoch's weights, on the
        training ``images`` (uint8): its per-epoch history. Most methods have none."""
        return []

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups; a group may set its own ``weight_decay``."""
        return [{"params": self.trainable_parameters()}]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and scores read as a stretched photo with no position statistics
        would be (:mod:`anomap.scoring` reads photos)."""
        maps = self.anomaly_map(images)
        return maps, image_score(maps, self.config)

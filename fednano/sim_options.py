"""The options ``fednano simulate`` and ``fednano fleet simulate`` share: one name, one meaning
and one default each, so a setting reads the same in the in-process simulation and in the fleet.

The defaults are the setting the paired comparison measured (``docs/results.md``): 5 devices,
3 rounds of 8 local steps of batch 16 at lr 2e-3, a Fisher from 32 samples per device when the
merge reads one; the training values are ``shared.training_defaults``, which the cloud's rounds
and the devices use too (plain numbers: ``--help`` need not import pydantic). Options renamed
here keep their old names as hidden aliases that still work and print a one-line note
(``renamed``).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import typer

from cloud.layout import DEFAULT_HOME, HOME_ENV, Layout
from shared import training_defaults as training

DEVICES = 5
ROUNDS = 3
ALPHA = 0.5
STEPS = training.STEPS
BATCH_SIZE = training.BATCH_SIZE
LR = training.LR
FISHER_SAMPLES = training.FISHER_SAMPLES
ROUND_EVAL_QUESTIONS = 300
STRATEGY = "fednano"

Devices = Annotated[int, typer.Option(help="Simulated devices.", min=1)]
Rounds = Annotated[int, typer.Option(help="Federated rounds.", min=1)]
Alpha = Annotated[float, typer.Option(
    help="Dirichlet concentration of the devices' data split (smaller: more skew).")]
Steps = Annotated[int, typer.Option(help="Local steps per device per round.", min=1)]
BatchSize = Annotated[int, typer.Option(help="Samples per local step.", min=1)]
Lr = Annotated[float, typer.Option(help="Local learning rate (AdamW).")]
FisherSamples = Annotated[int, typer.Option(
    help="Samples per device for its Fisher, in rounds whose merge reads one.", min=0)]
MaxSamples = Annotated[int | None, typer.Option(
    help="Training samples per device, a random subset of its shard (quick runs; 0 or unset: "
         "the whole shard).", min=0, show_default=False)]
RoundEvalQuestions = Annotated[int, typer.Option(
    help="Held-out test questions each round's new global model is evaluated on (0: none).",
    min=0)]
Seed = Annotated[int, typer.Option(help="Seed of the data split, the adapters and the batches.")]

T = TypeVar("T")


def home_option(help: str) -> Any:
    """``--home`` (env ``FEDNANO_HOME``): its default is ``Layout.default()``, taken when the
    command runs, so every command agrees with the cloud settings on where home is."""
    return typer.Option(envvar=HOME_ENV, default_factory=lambda: Layout.default().home,
                        show_default=f"${HOME_ENV} or {DEFAULT_HOME}", help=help)


def renamed(value: T, old_value: T | None, *, old: str, new: str, default: T) -> T:
    """The value of option ``new``, or ``old_value`` if it came under its former name ``old``
    (a one-line note on stderr). Both given: ``typer.BadParameter``."""
    if old_value is None:
        return value
    if value != default:
        raise typer.BadParameter(f"{old} is the former name of {new}: give only {new}")
    typer.echo(f"note: {old} is deprecated, use {new}", err=True)
    return old_value


def whole_shard(max_samples: int | None) -> int | None:
    """``--max-samples``: ``None`` (the whole shard) for 0 or unset, else the cap."""
    return max_samples or None

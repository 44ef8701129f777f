"""What a fleet run does: ``FleetOptions`` (every field is an option of ``fleet simulate``;
``eval_questions`` is ``--round-eval-questions``) and the fault names ``--faults`` accepts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cloud.strategies import STRATEGIES, make_strategy
from fednano import sim_options as opts
from shared.training import (
    BatchSize,
    FisherSamples,
    LearningRate,
    Steps,
    TaskHParams,
    round_hparams,
)

Fault = Literal["kill-device", "slow-device", "corrupt", "truncated", "oversized", "nan",
                "duplicate", "stale-base", "cloud-restart", "broker-restart", "broker-kill"]
FAULTS: tuple[Fault, ...] = ("kill-device", "slow-device", "corrupt", "truncated", "oversized",
                             "nan", "duplicate", "stale-base", "cloud-restart", "broker-restart",
                             "broker-kill")
# Payloads a rogue client publishes with a provisioned identity of its own.
ROGUE_FAULTS: frozenset[str] = frozenset({"corrupt", "truncated", "oversized", "nan",
                                          "stale-base"})
# Faults that take a process down: they fire one at a time.
DISRUPTIVE_FAULTS: frozenset[str] = frozenset({"kill-device", "slow-device", "cloud-restart",
                                               "broker-restart", "broker-kill"})


def parse_faults(text: str | None) -> tuple[Fault, ...]:
    """``"nan,duplicate"`` -> the faults in a fixed order; ``"all"`` is every fault;
    ``ValueError`` naming an unknown one."""
    if not text or not text.strip():
        return ()
    names = {part.strip() for part in text.split(",") if part.strip()}
    if "all" in names:
        return FAULTS
    unknown = sorted(names - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown faults {unknown}; known: all, {', '.join(FAULTS)}")
    return tuple(f for f in FAULTS if f in names)


class FleetOptions(BaseModel):
    """One fleet run: devices and their data, rounds and local training, faults, timing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The defaults are ``fednano simulate``'s (fednano.sim_options).
    devices: int = Field(opts.DEVICES, ge=1, le=512)
    alpha: float = Field(opts.ALPHA, gt=0, description="Dirichlet concentration of the shards")
    rounds: int = Field(opts.ROUNDS, ge=1)
    strategy: str = opts.STRATEGY
    steps: Steps = Field(opts.STEPS, description="local steps per round")
    batch_size: BatchSize = opts.BATCH_SIZE
    lr: LearningRate = opts.LR
    fisher_samples: FisherSamples = opts.FISHER_SAMPLES
    max_samples: int | None = Field(None, ge=1, description="per device (quick runs); None: "
                                                            "the whole shard")
    eval_questions: int = Field(opts.ROUND_EVAL_QUESTIONS, ge=0,
                                description="held-out questions per version")
    deadline_s: float = Field(600.0, gt=0, description="a round's deadline")
    database: str = Field("sqlite", description="'sqlite' (a file in the run folder) or the "
                                                "URL of an empty database")
    faults: tuple[Fault, ...] = ()
    network: Literal["loopback", "tls"] = Field(
        "loopback", description="loopback: devices reach the broker on 127.0.0.1 in plaintext; "
                                "tls: on this machine's network address over TLS, as a real "
                                "fleet does (a private CA signs the broker's certificate)")
    x509_devices: int = Field(0, ge=0, description="how many devices authenticate with a "
                                                   "certificate instead of a password (tls)")
    seed: int = 0
    llm_timeout_s: float = Field(20.0, gt=0, description="device -> LLM worker, per attempt")
    timeout_s: float = Field(3600.0, gt=0, description="give up on the run after this long")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
        return name

    @model_validator(mode="after")
    def _x509_over_tls(self) -> FleetOptions:
        if self.x509_devices and self.network != "tls":
            raise ValueError("X.509 devices connect over TLS: use network 'tls'")
        if self.x509_devices > self.devices:
            raise ValueError(f"x509_devices ({self.x509_devices}) exceeds devices "
                             f"({self.devices})")
        return self

    @model_validator(mode="after")
    def _fisher_when_needed(self) -> FleetOptions:
        needs = make_strategy(self.strategy).for_round(self.steps).training_needs()
        round_hparams(TaskHParams(fisher_samples=self.fisher_samples), needs)  # ValueError
        return self

    @property
    def rogue(self) -> bool:
        """Whether a rogue client joins (some payload fault was asked for)."""
        return any(f in ROGUE_FAULTS for f in self.faults)

"""In-process federated simulation on the real base: the paper-style comparison.

Every client trains through the same frozen LLM (an in-process ``LLMBackend``) with the same
device-side trainer the edge agent uses; the server side is the same strategy classes the cloud
runs. Traffic is counted from the real tensors: adapter parameters per round (what FedNano's
paper counts) and split-training activations per round (what it does not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm

from cloud.base.build import LoadedBase
from cloud.layout import Layout
from cloud.strategies import STRATEGIES, make_strategy
from edge.trainer import RoundResult, local_steps, run_round
from fednano.lockstep import run_rounds_lockstep
from shared.activations import DEFAULT_ENCODING, ActivationEncoding, WireBackend
from shared.adapters import AdapterState
from shared.backend import CountingBackend, LLMBackend, Traffic
from shared.batches import VisualLookup, VQABatcher
from shared.codec import Scheme, compression_report
from shared.data.base import VQASample, VQATask
from shared.data.partition import partition_samples, split_holdout
from shared.evaluation import EvalResult, evaluate
from shared.messages import UpdateCodec
from shared.nanoedge import NanoEdge
from shared.protocol import decode_update, error_feedback, update_parts
from shared.training import TrainConfig, resolve_training

BASELINES = ("local", "centralized", "feddpa-f")
# Schemes measured on real deltas for the report when a run compresses its uploads.
CODEC_SCHEMES = [Scheme.parse(s) for s in (
    "fp32", "fp16", "bf16", "int8/b64", "int8/b64+zstd", "int8/brow+zstd",
    "topk/k0.1+zstd", "topk/k0.01+zstd")]


class SimConfig(BaseModel):
    """One simulation run. Every field is a CLI option of ``fednano simulate`` (``clients`` is
    ``--devices`` and ``max_client_samples`` ``--max-samples``: reports keep the field names
    they always had)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = "fednano"  # a registered strategy or one of BASELINES
    task: Literal["easyvqa", "easyvqa+digits"] = "easyvqa"
    clients: int = Field(5, ge=1)
    alpha: float = Field(0.5, gt=0)
    partition: Literal["question", "image-class"] = "question"
    rounds: int = Field(3, ge=1)
    seed: int = 0
    train: TrainConfig = TrainConfig()
    prox_mu: float = Field(0.01, ge=0)
    fisher_normalize: Literal["mean", "max", "l2"] | None = None  # Fisher strategies' scaling
    # More keyword arguments of the strategy (e.g. {"ffa": true, "server_momentum": 0.9}).
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    # Batch the devices' LLM calls of a round into one (fednano.lockstep): same result up to
    # float rounding, K devices for about the LLM time of one on a GPU. None: on a GPU only (on
    # 2 CPU cores it was slower and the K-fold batch holds K times the activations).
    lockstep: bool | None = None

    @property
    def use_lockstep(self) -> bool:
        return self.lockstep if self.lockstep is not None else self.llm_device != "cpu"
    # The NanoAdapters' rank: the base's (its manifest records it); given, it must match.
    adapter_rank: int | None = Field(None, ge=1)
    min_samples: int = Field(32, ge=1)
    max_client_samples: int | None = Field(None, ge=1)  # subsample each device's data (quick runs)
    eval_questions: int = Field(1000, ge=1)
    round_eval_questions: int = Field(300, ge=0)
    client_holdout: int = Field(100, ge=0)
    # "question": a random slice of the device's questions (an image's other questions may stay
    # in training); "image": whole images held out, so no holdout image is trained on.
    holdout_by: Literal["question", "image"] = "image"
    eval_seed: int = 0  # the same held-out questions for every run, whatever its seed
    # Where the frozen LLM runs ("cuda" on a GPU machine); the devices' adapters stay on the CPU.
    llm_device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    # Compress what devices upload, as the edge agent does (``shared.codec`` scheme labels such
    # as "int8/b64+zstd" or "topk/k0.1+zstd"; each device keeps an error-feedback residual).
    # None: the server gets the exact fp32 deltas.
    delta_codec: str | None = None
    fisher_codec: str = "bf16+zstd"  # used only with delta_codec
    # How the devices' activations and gradients travel to and from the LLM
    # (``shared.activations``): every training call goes through the real encoding both ways.
    # Evaluation by the cloud is exact whatever this says.
    activations: ActivationEncoding = DEFAULT_ENCODING

    @field_validator("delta_codec", "fisher_codec")
    @classmethod
    def _scheme(cls, spec: str | None) -> str | None:
        return None if spec is None else Scheme.parse(spec).label()

    @model_validator(mode="after")
    def _known_strategy(self) -> SimConfig:
        if self.strategy not in BASELINES and self.strategy not in STRATEGIES:
            known = sorted([*STRATEGIES, *BASELINES])
            raise ValueError(f"unknown strategy {self.strategy!r}; known: {known}")
        if self.strategy not in BASELINES:
            make_strategy(self.strategy, **strategy_options(self))  # ValueError if they don't fit
        return self


def strategy_options(config: SimConfig) -> dict[str, Any]:
    """The keyword arguments the run's strategy is built with."""
    options: dict[str, Any] = {}
    if config.strategy == "fedprox":
        options["mu"] = config.prox_mu
    if config.fisher_normalize is not None:
        options["normalize"] = config.fisher_normalize
    return options | config.strategy_options


@dataclass
class ClientData:
    client_id: str
    train: list[VQASample]
    holdout: list[VQASample]


@dataclass
class RoundRecord:
    round: int
    accuracy: float | None
    mean_loss: float
    loss_first: float  # mean over devices of their first local step's loss
    loss_last: float  # ... and of their last
    param_bytes_up: int  # per device
    param_bytes_down: int
    activation_bytes_up: int  # per device, split training (steps + Fisher)
    activation_bytes_down: int
    seconds: float


@dataclass
class SimReport:
    config: dict[str, object]
    base_version: str
    zero_shot: dict[str, object]
    final: dict[str, object]
    per_client: dict[str, dict[str, float]]
    rounds: list[RoundRecord] = field(default_factory=list)
    clients: list[dict[str, object]] = field(default_factory=list)
    storage: dict[str, float] = field(default_factory=dict)
    adapter_parameters: int = 0
    seconds: float = 0.0
    # Bytes and relative error of each codec scheme on real deltas (round 1, first device).
    codec_report: list[dict[str, object]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, default=lambda o: o.__dict__, indent=2)


def split_clients(
    task: VQATask, config: SimConfig
) -> list[ClientData]:
    """Dirichlet-partition the task's train split; hold part of each client's data out."""
    n_train = len(task.train)
    if config.clients * config.min_samples > n_train:
        raise ValueError(
            f"{config.clients} clients x min {config.min_samples} samples exceeds the "
            f"{n_train} training samples"
        )
    parts = partition_samples(
        task.train, config.clients, config.alpha, by=config.partition,
        min_samples=config.min_samples, seed=config.seed,
    )
    rng = random.Random(config.seed)
    clients = []
    for k, part in enumerate(parts):
        if config.holdout_by == "image":
            n_images = len({s.image_key for s in part})
            n_hold = min(config.client_holdout, n_images // 5)  # counts images here
            rest, holdout = split_holdout(part, n_hold, config.seed + k, by_image=True)
            rest = rng.sample(rest, len(rest))
        else:
            shuffled = rng.sample(part, len(part))
            n_hold = min(config.client_holdout, len(part) // 5)
            rest, holdout = shuffled[n_hold:], shuffled[:n_hold]
        train = rest[: config.max_client_samples]
        clients.append(ClientData(f"client-{k:02d}", train, holdout))
    return clients


def eval_split(task: VQATask, n: int, seed: int) -> list[VQASample]:
    """A fixed sample of the held-out test split (never seen by any device)."""
    if n > len(task.test):
        raise ValueError(f"asked for {n} eval questions but the test split has {len(task.test)}")
    return random.Random(seed).sample(task.test, n)


class Simulation:
    """Runs one ``SimConfig`` on a loaded base and a task."""

    def __init__(self, base: LoadedBase, task: VQATask, config: SimConfig,
                 cache: RoundCache | None = None) -> None:
        self.base = base
        self.task = task
        self.config = config
        self.cache = cache or RoundCache()
        self.backend = CountingBackend(base.backend)
        self.clients = split_clients(task, config)
        self.eval_set = eval_split(task, config.eval_questions, config.eval_seed)
        self.round_eval = self.eval_set[: config.round_eval_questions]
        self.batcher = VQABatcher(
            base.tokenizer, base.template, self._visual_lookup(), base.connector.num_tokens
        )
        self._feedback: dict[str, AdapterState] = {}  # error-feedback residual per device

    def _visual_lookup(self) -> VisualLookup:
        """Connector outputs of every image the run touches, computed once (frozen base)."""
        used = [*self.eval_set, *(s for c in self.clients for s in c.train + c.holdout)]
        keys = sorted({s.image_key for s in used})
        self.base.features.extract(
            keys, self.task.load_image, self.base.pretrained.encoder, self.base.connector
        )
        index = {k: i for i, k in enumerate(keys)}
        with torch.no_grad():
            table = torch.cat([
                self.base.connector.project(self.base.features.get(keys[i : i + 512]))
                for i in range(0, len(keys), 512)
            ])  # (N, V, d)

        def lookup(batch_keys: Sequence[str]) -> torch.Tensor:
            unknown = [k for k in batch_keys if k not in index]
            if unknown:
                raise ValueError(f"no visual tokens for image keys {unknown[:3]!r}")
            return table[[index[k] for k in batch_keys]]

        return lookup

    def evaluate(self, state: AdapterState, samples: Sequence[VQASample]) -> EvalResult:
        self.base.edge.adapters.load_adapter_state_dict(state)
        return evaluate(
            self.base.edge, self.backend.inner, self.batcher, samples, self.task.answers,
            progress=f"evaluating {len(samples)} questions",
        )

    def storage(self) -> dict[str, float]:
        """What a device stores vs the whole MLLM, counted on the loaded base."""
        from cloud.footprint import measure_footprint

        fp = measure_footprint("base", self.base.edge, self.base.backend)
        return {
            "device_params": fp.device_params, "whole_params": fp.whole_params,
            "device_share_pct": fp.device_share_pct,
            "storage_reduction_pct": fp.storage_reduction_pct,
            "device_bytes_shipped": fp.device_bytes_shipped,
            "adapter_params": fp.adapter_params,
        }

    def zero_shot(self, identity: AdapterState) -> EvalResult:
        """The base's accuracy (identity adapters) on the eval set, cached per base and set."""
        keys = "|".join(f"{s.image_key}:{s.question}" for s in self.eval_set)
        digest = hashlib.sha256(keys.encode()).hexdigest()[:16]
        path = Layout(self.base.home).evals / f"zero-shot-{self.base.version}-{digest}.json"
        if path.exists():
            return EvalResult(**json.loads(path.read_text()))
        result = self.evaluate(identity, self.eval_set)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.as_dict()))
        tmp.replace(path)
        return result

    def fresh_state(self) -> AdapterState:
        torch.manual_seed(self.config.seed)
        self.base.edge.adapters.image.update_layer(self.base.edge.adapters.config)
        self.base.edge.adapters.text.update_layer(self.base.edge.adapters.config)
        return self.base.edge.adapters.adapter_state_dict()

    def run(self) -> SimReport:
        started = time.perf_counter()
        initial = self.fresh_state()
        zero_shot = self.zero_shot(initial)
        report = SimReport(
            config=self.config.model_dump(), base_version=str(self.base.manifest["version"]),
            zero_shot=zero_shot.as_dict(), final={}, per_client={},
            adapter_parameters=self.base.edge.adapters.num_parameters(),
            clients=[{"id": c.client_id, "train": len(c.train), "holdout": len(c.holdout)}
                     for c in self.clients],
        )
        report.storage = self.storage()
        if self.config.strategy == "local":
            self._run_local(initial, report)
        elif self.config.strategy == "feddpa-f":
            self._run_feddpa(initial, report)
        else:
            self._run_federated(initial, report)
        report.seconds = time.perf_counter() - started
        return report

    def _run_federated(self, initial: AdapterState, report: SimReport) -> None:
        cfg = self.config
        centralized = cfg.strategy == "centralized"
        state = self._federated_rounds(initial, report, "fedavg" if centralized else cfg.strategy)
        report.final = self.evaluate(state, self.eval_set).as_dict()
        report.final["kind"] = "centralized model" if centralized else "global model"
        report.per_client = {
            c.client_id: {"holdout_accuracy": self.evaluate(state, c.holdout).accuracy}
            for c in self.clients if c.holdout
        }
        report.final |= _holdout_summary(report.per_client)

    def _federated_rounds(self, initial: AdapterState, report: SimReport,
                          strategy_name: str) -> AdapterState:
        """The run's rounds with ``strategy_name``; returns the last global state."""
        cfg = self.config
        centralized = cfg.strategy == "centralized"
        strategy = make_strategy(strategy_name,
                                 **(strategy_options(cfg) if strategy_name == cfg.strategy
                                    else {})).for_round(cfg.train.steps)
        # The run's settings stand for the devices' own values (the profile); the strategy's
        # come first, as on a device of the fleet.
        train_cfg = resolve_training(cfg.train, needs=strategy.training_needs())
        if centralized:  # one "device" with all the data does the fleet's steps per round
            train_cfg = train_cfg.model_copy(update={"steps": train_cfg.steps * cfg.clients})
        clients = [_pooled(self.clients)] if centralized else self.clients
        state, previous_step = initial, None
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            before = _snapshot(self.backend.training)
            results = self._device_rounds(clients, state, train_cfg, r)
            upload = self._upload(results, report) if cfg.delta_codec else None
            merged = strategy.aggregate(state, [res.update for res in results], previous_step)
            if merged is None:
                raise RuntimeError(f"round {r}: strategy {strategy.name} could not aggregate")
            previous_step = {k: merged[k] - state[k] for k in state}
            state = merged
            acc = self.evaluate(state, self.round_eval).accuracy if self.round_eval else None
            losses = [x for res in results for x in res.losses]
            record = self._round_record(r, acc, losses, results, before, t0, len(clients))
            if upload is not None:
                record.param_bytes_up = upload
            report.rounds.append(record)
        return state

    def _run_feddpa(self, initial: AdapterState, report: SimReport) -> None:
        """FedDPA-F: FedAvg rounds for the global pair, then each device trains its local pair
        (``train.steps`` more steps) and is evaluated with both (``fednano.feddpa``)."""
        from fednano.feddpa import DualNanoEdge

        cfg = self.config
        state = self._federated_rounds(initial, report, "fedavg")
        global_accuracy = self.evaluate(state, self.eval_set)
        # The local pair trains like a FedAvg device: no Fisher, no proximal term.
        train_cfg = resolve_training(cfg.train, needs=make_strategy("fedavg").training_needs())
        finals: list[EvalResult] = []
        for k, client in enumerate(self.clients):
            torch.manual_seed(cfg.seed * 1000 + 900 + k)  # the local pair's random A
            dual = DualNanoEdge(self.base.edge, self.base.edge.adapters.config, state)
            generator = torch.Generator().manual_seed(cfg.seed * 1000 + 900 + k)
            local_steps(dual, self._link(), self.batcher, client.train,
                        dual.adapters.adapter_state_dict(), train_cfg, generator)
            dual.reference = torch.cat([dual.representation(*self.batcher.batch(
                client.train[i:i + 64])) for i in range(0, len(client.train), 64)])
            finals.append(evaluate(dual, self.backend.inner, self.batcher, self.eval_set,
                                   self.task.answers))
            report.per_client[client.client_id] = {"test_accuracy": finals[-1].accuracy}
            if client.holdout:
                report.per_client[client.client_id]["holdout_accuracy"] = evaluate(
                    dual, self.backend.inner, self.batcher, client.holdout,
                    self.task.answers).accuracy
        accs = [f.accuracy for f in finals]
        report.final = {
            "accuracy": statistics.fmean(accs), "n": finals[0].n,
            "kind": "mean of personalised models (global + weighted local pair)",
            "client_spread": statistics.pstdev(accs), "per_type": _mean_per_type(finals),
            "global_accuracy": global_accuracy.accuracy, **_holdout_summary(report.per_client),
        }

    def _device_rounds(self, clients: Sequence[ClientData], state: AdapterState,
                       train_cfg: TrainConfig, r: int) -> list[RoundResult]:
        """Every device's round from ``state``: side by side (lockstep) or one after another.

        Each device counts its own LLM traffic; the totals join ``self.backend``'s counters.
        A round another method of the same run already trained (same global state, data, seed
        and settings: round 1, typically) comes from ``self.cache`` with its traffic.
        """
        seed = self.config.seed * 1000 + r * 100
        found = [self.cache.lookup(state, c.client_id, train_cfg, seed + k, r)
                 for k, c in enumerate(clients)]
        todo = [k for k, hit in enumerate(found) if hit is None]
        counters = {k: CountingBackend(self.backend.inner) for k in todo}

        def device(k: int) -> Callable[[NanoEdge, LLMBackend], RoundResult]:
            def go(edge: NanoEdge, llm: LLMBackend) -> RoundResult:
                counters[k].inner = WireBackend(llm, self.config.activations)
                return run_round(edge, counters[k], self.batcher, clients[k].train, state,
                                 train_cfg, client_id=clients[k].client_id, seed=seed + k,
                                 base_version=r - 1)
            return go

        rounds = [device(k) for k in todo]
        if self.config.use_lockstep and len(rounds) > 1:
            fresh, _ = run_rounds_lockstep(self.base.edge, self.backend.inner, rounds)
        else:
            label = f"round {r}/{self.config.rounds}"
            fresh = [go(self.base.edge, self.backend.inner)
                     for go in tqdm(rounds, desc=label, leave=False)]
        for k, result in zip(todo, fresh, strict=True):
            traffic, training = Traffic(), Traffic()
            _add_traffic(traffic, counters[k].training)
            _add_traffic(traffic, counters[k].scoring)  # the sampled-label Fisher's calls
            if train_cfg.fisher_point == "local":  # local steps come first, then the Fisher
                steps = counters[k].training.per_step[: train_cfg.steps]
                training = Traffic(sum(u for u, _ in steps), sum(d for _, d in steps),
                                   len(steps), list(steps))
            self.cache.store(state, clients[k].client_id, train_cfg, seed + k, r, result,
                             traffic, training)
            found[k] = (result, traffic)
        self.cache.hits += len(clients) - len(todo)
        results = []
        for hit in found:
            assert hit is not None
            _add_traffic(self.backend.training, hit[1])
            results.append(hit[0])
        return results

    def _link(self) -> LLMBackend:
        """The LLM as a training device reaches it: through the run's activation encoding."""
        return WireBackend(self.backend.inner, self.config.activations)

    def _upload(self, results: list[RoundResult], report: SimReport) -> int:
        """Replace each update by what the server decodes from the device's frames.

        Returns the mean bytes uploaded per device (delta frame + Fisher frame).
        """
        assert self.config.delta_codec is not None
        schemes = UpdateCodec(delta=Scheme.parse(self.config.delta_codec),
                              fisher=Scheme.parse(self.config.fisher_codec))
        if not report.codec_report:
            report.codec_report = compression_report(results[0].update.delta, CODEC_SCHEMES)
        sizes = []
        for res in results:
            update = res.update
            # The device's path (edge.device_round.encode_update): error feedback, then frames.
            sent, self._feedback[update.client_id] = error_feedback(
                update.delta, schemes.delta, self._feedback.get(update.client_id, {}))
            parts = update_parts(sent, update.fisher, schemes)
            expected = {k: tuple(v.shape) for k, v in update.delta.items()}
            update.delta, update.fisher = decode_update(parts, expected=expected)  # the server's
            sizes.append(sum(len(frame) for frame in parts.values()))
        return sum(sizes) // len(sizes)

    def _run_local(self, initial: AdapterState, report: SimReport) -> None:
        """Each client trains alone for all rounds' steps; no communication of parameters."""
        cfg = self.config
        train_cfg = cfg.train.model_copy(update={"fisher_samples": 0})
        finals: list[EvalResult] = []
        for k, client in enumerate(self.clients):
            state = initial
            for r in range(1, cfg.rounds + 1):
                res = run_round(self.base.edge, self._link(), self.batcher, client.train, state,
                                train_cfg, client_id=client.client_id,
                                seed=cfg.seed * 1000 + r * 100 + k)
                state = {key: state[key] + res.update.delta[key] for key in state}
            finals.append(self.evaluate(state, self.eval_set))
            report.per_client[client.client_id] = {"test_accuracy": finals[-1].accuracy}
            if client.holdout:
                holdout = self.evaluate(state, client.holdout).accuracy
                report.per_client[client.client_id]["holdout_accuracy"] = holdout
        accs = [f.accuracy for f in finals]
        report.final = {
            "accuracy": statistics.fmean(accs), "n": finals[0].n, "kind": "mean of local models",
            "client_spread": statistics.pstdev(accs), "per_type": {},
            **_holdout_summary(report.per_client),
        }

    def _round_record(
        self, r: int, acc: float | None, losses: list[float], results: list[RoundResult],
        before: tuple[int, int], t0: float, n_clients: int,
    ) -> RoundRecord:
        up, down = (x - y for x, y in zip(_snapshot(self.backend.training), before, strict=True))
        params = self.base.edge.adapters.num_parameters() * 4  # fp32 on the wire (uncompressed)
        sends_fisher = results[0].update.fisher is not None
        return RoundRecord(
            round=r, accuracy=acc, mean_loss=statistics.fmean(losses),
            loss_first=statistics.fmean(res.losses[0] for res in results),
            loss_last=statistics.fmean(res.losses[-1] for res in results),
            param_bytes_up=params * (2 if sends_fisher else 1), param_bytes_down=params,
            activation_bytes_up=up // n_clients, activation_bytes_down=down // n_clients,
            seconds=time.perf_counter() - t0,
        )


FISHER_FIELDS = ("fisher_samples", "fisher_batch_size", "fisher_labels", "fisher_point")


class RoundCache:
    """Device rounds already trained in this process, for the other methods of a paired run.

    A device round is a pure function of the global state, the device's data, the training
    settings, the seed and the round number, so methods that start a round from the same global
    state (every method's round 1, unless it changes what devices train) can share it. A Fisher
    taken after local training (``fisher_point="local"``) does not change the training, so a
    method without a Fisher reuses a round trained for a Fisher method (minus the Fisher and its
    LLM traffic). Entries are stored and handed out as copies: a method may compress (replace)
    its update's tensors.
    """

    def __init__(self) -> None:
        # training key -> Fisher settings (None: no Fisher) -> (result, traffic, training only)
        self._entries: dict[str, dict[str | None, tuple[RoundResult, Traffic, Traffic]]] = {}
        self.hits = 0

    def lookup(self, state: AdapterState, client_id: str, config: TrainConfig, seed: int,
               r: int) -> tuple[RoundResult, Traffic] | None:
        variants = self._entries.get(self._train_key(state, client_id, config, seed, r), {})
        sig = _fisher_signature(config)
        if sig in variants:
            result, traffic, _ = variants[sig]
            return _copy_result(result), traffic
        if sig is None and variants:  # a Fisher method trained it: drop its Fisher
            result, _, training = next(iter(variants.values()))
            copy = _copy_result(result)
            copy.update.fisher = None
            return copy, training
        return None

    def store(self, state: AdapterState, client_id: str, config: TrainConfig, seed: int,
              r: int, result: RoundResult, traffic: Traffic, training: Traffic) -> None:
        key = self._train_key(state, client_id, config, seed, r)
        self._entries.setdefault(key, {})[_fisher_signature(config)] = (
            _copy_result(result), traffic, training)

    @staticmethod
    def _train_key(state: AdapterState, client_id: str, config: TrainConfig, seed: int,
                   r: int) -> str:
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
        # A Fisher at the global point draws its samples before training: not shareable.
        shared = config.fisher_samples == 0 or config.fisher_point == "local"
        train = config.model_dump(exclude=set(FISHER_FIELDS)) if shared else config.model_dump()
        digest.update(f"|{client_id}|{json.dumps(train, sort_keys=True)}|{seed}|{r}".encode())
        return digest.hexdigest()


def _fisher_signature(config: TrainConfig) -> str | None:
    if config.fisher_samples == 0:
        return None
    return json.dumps({f: getattr(config, f) for f in FISHER_FIELDS}, sort_keys=True)


def _copy_result(result: RoundResult) -> RoundResult:
    update = result.update
    fisher = None if update.fisher is None else {k: v.clone() for k, v in update.fisher.items()}
    copy = dataclasses.replace(update, delta={k: v.clone() for k, v in update.delta.items()},
                               fisher=fisher, metrics=dict(update.metrics))
    return RoundResult(copy, list(result.losses))


def _mean_per_type(results: Sequence[EvalResult]) -> dict[str, float]:
    types = sorted({t for r in results for t in r.per_type})
    return {t: statistics.fmean(r.per_type[t] for r in results if t in r.per_type)
            for t in types}


def _holdout_summary(per_client: dict[str, dict[str, float]]) -> dict[str, float]:
    accs = [v["holdout_accuracy"] for v in per_client.values() if "holdout_accuracy" in v]
    if not accs:
        return {}
    return {"holdout_mean": statistics.fmean(accs), "holdout_spread": statistics.pstdev(accs)}


def check_alignment_data(task: VQATask, manifest: dict[str, Any]) -> None:
    """Refuse a task whose reserved alignment images are not the ones the base was aligned on.

    Otherwise images the connector was aligned on could sit in a device's training data.
    """
    settings = manifest.get("alignment", {}).get("settings", {})
    expected = settings.get("pairs_sha256")
    if expected is None:  # bases built before the hash was recorded: compare the count
        if settings.get("n_pairs") not in (None, len(task.align)):
            raise ValueError(
                f"base was aligned on {settings.get('n_pairs')} images, task reserves "
                f"{len(task.align)}: rebuild the base or load the task with the same settings"
            )
        return
    actual = hashlib.sha256(json.dumps(task.align).encode()).hexdigest()
    if actual != expected:
        raise ValueError(
            "the task's reserved alignment images differ from the base's (pairs_sha256 "
            f"{actual[:12]} vs {str(expected)[:12]}): alignment images could leak into device "
            "data; build the base and load the task with the same n_align_images/data_seed"
        )


def _pooled(clients: Sequence[ClientData]) -> ClientData:
    return ClientData("centralized", [s for c in clients for s in c.train], [])


def _add_traffic(total: Traffic, part: Traffic) -> None:
    total.up += part.up
    total.down += part.down
    total.steps += part.steps
    total.per_step += part.per_step


def _snapshot(traffic: Traffic) -> tuple[int, int]:
    return traffic.up, traffic.down


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fisher-norm:ffa=true,server_lr=2"`` -> ``("fisher-norm", {"ffa": True, ...})``.

    Values are read as JSON where they parse (numbers, true/false, null), else as strings.
    """
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method option {item!r} in {spec!r} is not KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return name.strip(), options


def method_spec(config: SimConfig | dict[str, Any]) -> str:
    """The method of a run as a spec ``parse_method`` reads back (strategy and its options)."""
    data = config if isinstance(config, dict) else config.model_dump()
    options = dict(data.get("strategy_options") or {})
    if data.get("fisher_normalize"):
        options = {"normalize": data["fisher_normalize"], **options}
    if not options:
        return str(data["strategy"])
    body = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(options.items()))
    return f"{data['strategy']}:{body}"


def run_methods(configs: Sequence[SimConfig], home: Path, out: Path | None = None,
                ) -> list[SimReport]:
    """Run several methods on the same setting and seed in one process (a paired run).

    They share the loaded base, the data partition, the held-out questions and every device
    round that starts from the same global state (``RoundCache``). With ``out``, each report is
    saved to ``out/<method spec>/`` as soon as it finishes, and a method whose report is there
    already is skipped (so an interrupted grid resumes).
    """
    settings = {c.model_dump_json(exclude={"strategy", "strategy_options", "fisher_normalize",
                                           "prox_mu"}) for c in configs}
    if len(settings) > 1:
        raise ValueError("a paired run needs the same settings for every method "
                         "(only the strategy and its options may differ)")
    base, task = load_base_and_task(configs[0], home)
    cache = RoundCache()
    reports = []
    # Methods with a Fisher first: the others can then reuse their rounds without the Fisher.
    for config in sorted(configs, key=lambda c: not _needs_fisher(c)):
        folder = None if out is None else out / method_folder(config)
        if folder is not None and (folder / "report.json").exists():
            continue
        report = Simulation(base, task, with_base_rank(config, base), cache=cache).run()
        if folder is not None:
            save_report(report, folder)
        reports.append(report)
    return reports


def _needs_fisher(config: SimConfig) -> bool:
    if config.strategy in BASELINES:
        return False
    strategy = make_strategy(config.strategy, **strategy_options(config))
    return strategy.for_round(config.train.steps).requires_fisher


def method_folder(config: SimConfig) -> str:
    """A file-system-safe folder name for a run's method spec."""
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", method_spec(config).replace(":", "+"))


def load_and_run(config: SimConfig, home: Path, task: VQATask | None = None) -> SimReport:
    """Load (building it first if there is none) the base, load easy-VQA, run ``config``."""
    base, task = load_base_and_task(config, home, task)
    return Simulation(base, task, with_base_rank(config, base)).run()


def with_base_rank(config: SimConfig, base: LoadedBase) -> SimConfig:
    """``config`` with the base's adapter rank filled in (the report says what ran);
    ``AdapterMismatchError`` when it asked for another one."""
    from cloud.base.manifest import require_rank

    adapter = require_rank(base.adapter_config, config.adapter_rank, base.version)
    return config.model_copy(update={"adapter_rank": adapter.rank})


def load_base_and_task(config: SimConfig, home: Path, task: VQATask | None = None,
                       ) -> tuple[LoadedBase, VQATask]:
    """The base (built first if there is none, at ``config.adapter_rank``) on
    ``config.llm_device``, and the task; ``AdapterMismatchError`` when the base records another
    adapter rank than ``config`` asks for."""
    from cloud.base.build import build_base, load_base
    from cloud.base.manifest import BaseNotBuiltError, adapter_for_rank, read_manifest, require_rank

    rank = config.adapter_rank
    try:
        manifest = read_manifest(home)
    except BaseNotBuiltError:
        print(f"no base under {home}: building it once (a few minutes)")
        build_base(home, adapter=None if rank is None else adapter_for_rank(rank))
        manifest = read_manifest(home)
    require_rank(manifest.adapter, rank, manifest.version)  # before the LLM loads
    base = load_base(home, manifest.version)
    base.backend.to(config.llm_device)
    task = task or load_task(config.task)
    check_alignment_data(task, base.manifest)
    return base, task


def load_task(name: str) -> VQATask:
    """easy-VQA (with the base's reserved alignment images held out), optionally + digits."""
    from shared.data.digits import combine_tasks, load_digits_vqa
    from shared.data.easyvqa import load_easy_vqa

    if name == "easyvqa":
        return load_easy_vqa()
    if name == "easyvqa+digits":
        return combine_tasks(load_easy_vqa(), load_digits_vqa(), name=name)
    raise ValueError(f"unknown task {name!r}; known: easyvqa, easyvqa+digits")


def save_report(report: SimReport, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(report.to_json())
    md_path.write_text(report_markdown(report))
    return json_path, md_path


def report_markdown(report: SimReport) -> str:
    """The report as markdown: the setting and its results, then one table per view."""
    lines = [*_summary_lines(report), "", *_round_rows(report), *_codec_rows(report), "",
             *_client_rows(report)]
    return "\n".join(lines) + "\n"


def _summary_lines(report: SimReport) -> list[str]:
    cfg = report.config
    uploads = (f"- uploads compressed: delta {cfg.get('delta_codec')}, Fisher "
               f"{cfg.get('fisher_codec')}" if cfg.get("delta_codec")
               else "- uploads uncompressed (fp32)")
    return [
        f"# {cfg['strategy']}: {cfg['clients']} clients, alpha={cfg['alpha']}, "
        f"{cfg['rounds']} rounds, seed {cfg['seed']}",
        "",
        f"- base {report.base_version}; zero-shot accuracy {report.zero_shot['accuracy']:.3f} "
        f"on {report.zero_shot['n']} held-out questions",
        f"- final accuracy {report.final['accuracy']:.3f} on {report.final['n']} questions",
        f"- adapter parameters {report.adapter_parameters:,}; wall time {report.seconds:.0f} s",
        _storage_line(report.storage),
        uploads,
    ]


def _round_rows(report: SimReport) -> list[str]:
    lines = ["| round | accuracy | loss | params up/dev | params down/dev | activations up/dev "
             "| activations down/dev | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report.rounds:
        acc = "" if r.accuracy is None else f"{r.accuracy:.3f}"
        lines.append(
            f"| {r.round} | {acc} | {r.mean_loss:.3f} | {_kb(r.param_bytes_up)} | "
            f"{_kb(r.param_bytes_down)} | {_kb(r.activation_bytes_up)} | "
            f"{_kb(r.activation_bytes_down)} | {r.seconds:.0f} |"
        )
    return lines


def _codec_rows(report: SimReport) -> list[str]:
    if not report.codec_report:
        return []
    return ["", "| codec on a real delta | bytes | vs fp32 | relative error |", "|---|---|---|---|",
            *(f"| {c['scheme']} | {c['bytes']:,} | {c['ratio_vs_fp32']:.1f}x | "
              f"{c['rel_error']:.2e} |" for c in report.codec_report)]


def _client_rows(report: SimReport) -> list[str]:
    columns = list(next(iter(report.per_client.values()), {}))
    return ["| client | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns),
            *(f"| {cid} | " + " | ".join(f"{v:.3f}" for v in vals.values()) + " |"
              for cid, vals in report.per_client.items())]


def _storage_line(storage: dict[str, float]) -> str:
    if not storage:
        return "- client storage: not recorded"
    return (
        f"- client storage: {storage['device_params']:,.0f} of {storage['whole_params']:,.0f} "
        f"parameters ({storage['device_share_pct']:.1f} %, "
        f"{storage['storage_reduction_pct']:.1f} % less than the whole MLLM)"
    )


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"

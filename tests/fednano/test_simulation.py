"""The simulation loop end to end on a tiny random model and a synthetic colour task (seconds)."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from cloud.base.features import FeatureStore
from edge.device_round import encode_update
from edge.trainer import RoundResult, TrainConfig
from fednano.compare import load_reports, pivot_markdown
from fednano.simulate import SimConfig, SimReport, Simulation, report_markdown, save_report
from shared.adapters import AdapterConfig, AdapterState
from shared.codec import Scheme
from shared.connector import PoolingConnector
from shared.data.base import VQASample, VQATask
from shared.messages import TrainTask, UpdateCodec, UpdateMessage, unpack
from shared.nanoedge import NanoEdge
from shared.prompts import PromptTemplate
from shared.protocol import decode_update
from shared.update import AdapterUpdate
from tests.recorded_base import write_recorded_base

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}


def colour_task(n_train: int = 90, n_test: int = 30) -> VQATask:
    names = list(COLOURS)

    def samples(split: str, n: int) -> list[VQASample]:
        return [
            VQASample(f"toy/{split}/{i}", "what color is the shape?", names[i % 3], "color",
                      names[i % 3])
            for i in range(n)
        ]

    def load_image(key: str) -> Image.Image:
        colour = names[int(key.rsplit("/", 1)[1]) % 3]
        jitter = zlib.crc32(key.encode()) % 30
        return Image.new("RGB", (16, 16), tuple(c + jitter for c in COLOURS[colour]))

    return VQATask("toy", names, samples("train", n_train), samples("test", n_test), load_image)


@pytest.fixture
def tiny_base(tmp_path: Path, tiny_llm, word_tokenizer):  # type: ignore[no-untyped-def]
    model, backend = tiny_llm
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Conv2d(3, 12, 1)).eval()
    connector = PoolingConnector(12, 32, grid=2)
    embedder = nn.Embedding.from_pretrained(model.get_input_embeddings().weight.clone())
    adapter_config = AdapterConfig(rank=4, alpha=8)
    edge = NanoEdge(connector, embedder, adapter_config, encoder=encoder)
    return SimpleNamespace(
        edge=edge, adapter_config=adapter_config, backend=backend, connector=connector,
        tokenizer=word_tokenizer,
        template=PromptTemplate(), features=FeatureStore(tmp_path / "features"),
        pretrained=SimpleNamespace(encoder=encoder), manifest={"version": "tiny"},
        version="tiny", home=tmp_path,
    )


def config(strategy: str, **overrides: object) -> SimConfig:
    settings: dict[str, object] = dict(
        strategy=strategy, clients=3, alpha=0.5, rounds=2, min_samples=8, eval_questions=30,
        round_eval_questions=12, client_holdout=4,
        train=TrainConfig(steps=3, batch_size=4, lr=1e-2, fisher_samples=6),
    )
    return SimConfig(**(settings | overrides))


@pytest.mark.parametrize("strategy", ["fednano", "fedavg", "fedprox", "fisher-raw",
                                      "fisher-global", "local", "centralized", "feddpa-f"])
def test_every_method_runs_and_reports(tiny_base, strategy: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report = Simulation(tiny_base, colour_task(), config(strategy)).run()
    assert report.final["n"] == 30
    # A share of the 30 held-out questions (local: the mean over the 3 clients' models).
    answers = 30 * (3 if strategy in ("local", "feddpa-f") else 1)
    correct = report.final["accuracy"] * answers
    assert 0 <= correct <= answers and abs(correct - round(correct)) < 1e-9
    assert set(report.per_client) == {"client-00", "client-01", "client-02"}
    assert 0 < report.storage["device_params"] < report.storage["whole_params"]
    if strategy == "local":
        assert report.rounds == [] and "client_spread" in report.final
    else:
        assert [r.round for r in report.rounds] == [1, 2]
        params = tiny_base.edge.adapters.num_parameters() * 4
        # fednano merges 3-step rounds by FedAvg: its devices send no Fisher there.
        fisher = 2 if strategy.startswith("fisher") else 1
        assert report.rounds[0].param_bytes_up == fisher * params
        assert report.rounds[0].activation_bytes_up > 0
    json_path, md_path = save_report(report, tmp_path / strategy)
    assert json.loads(json_path.read_text())["config"]["strategy"] == strategy
    assert strategy in md_path.read_text()
    assert strategy in pivot_markdown(load_reports([tmp_path / strategy]))
    if strategy == "feddpa-f":  # personalised: both pairs on each device's own holdout
        assert "holdout_mean" in report.final and "global_accuracy" in report.final


def test_zero_shot_is_cached_per_base_and_eval_set(tiny_base) -> None:  # type: ignore[no-untyped-def]
    Simulation(tiny_base, colour_task(), config("fedavg", rounds=1)).run()
    assert len(list((tiny_base.home / "evals").glob("zero-shot-tiny-*.json"))) == 1


def test_bad_settings_name_the_problem(tiny_base) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        config("fedsgd")
    with pytest.raises(ValueError, match="alpha"):
        config("fednano", alpha=0.0)
    with pytest.raises(ValueError, match="exceeds the 90 training samples"):
        Simulation(tiny_base, colour_task(), config("fednano", clients=20, min_samples=8))
    with pytest.raises(ValueError, match="asked for 500 eval questions"):
        Simulation(tiny_base, colour_task(), config("fednano", eval_questions=500))


def test_image_holdout_keeps_holdout_images_out_of_training(tiny_base) -> None:  # type: ignore[no-untyped-def]
    # 6 questions per image, so a question holdout would leave an image on both sides.
    task = colour_task()
    task.train = [
        VQASample(s.image_key, f"{q} {s.question}", s.answer, s.question_type, s.image_class)
        for s in task.train[:30] for q in ("a", "b", "c", "d", "e", "f")
    ]
    sim = Simulation(tiny_base, task, config("fedavg", holdout_by="image", client_holdout=2))
    for client in sim.clients:
        assert client.holdout
        assert not {s.image_key for s in client.holdout} & {s.image_key for s in client.train}


def test_local_and_centralized_bookkeeping(tiny_base) -> None:  # type: ignore[no-untyped-def]
    local = Simulation(tiny_base, colour_task(), config("local")).run()
    assert local.final["kind"] == "mean of local models" and "holdout_mean" in local.final
    central = Simulation(tiny_base, colour_task(), config("centralized", rounds=1,
                                                          activations="fp32")).run()
    assert central.final["kind"] == "centralized model"
    fedavg = Simulation(tiny_base, colour_task(), config("fedavg", rounds=1,
                                                         activations="fp32")).run()
    # One learner doing the fleet's steps: 3 devices x 3 steps, vs 3 steps per fedavg device
    # (same question everywhere and exact fp32 activations, which zstd does not resize, so
    # every step moves the same bytes).
    assert central.rounds[0].activation_bytes_up == 3 * fedavg.rounds[0].activation_bytes_up


def test_alignment_images_must_match_the_base() -> None:
    from fednano.simulate import check_alignment_data

    task = colour_task()
    task.align = [("toy/train/0", "A red square.")]
    digest = __import__("hashlib").sha256(json.dumps(task.align).encode()).hexdigest()
    check_alignment_data(task, {"alignment": {"settings": {"pairs_sha256": digest}}})
    with pytest.raises(ValueError, match="alignment images differ"):
        check_alignment_data(task, {"alignment": {"settings": {"pairs_sha256": "0" * 64}}})
    with pytest.raises(ValueError, match="aligned on 400 images"):
        check_alignment_data(task, {"alignment": {"settings": {"n_pairs": 400}}})


def test_compressed_uploads_shrink_bytes_and_fp32_changes_nothing(tiny_base) -> None:  # type: ignore[no-untyped-def]
    plain = Simulation(tiny_base, colour_task(), config("fisher-norm")).run()
    exact = Simulation(tiny_base, colour_task(), config("fisher-norm", delta_codec="fp32",
                                                        fisher_codec="fp32")).run()
    assert exact.final["accuracy"] == plain.final["accuracy"]
    sparse = Simulation(tiny_base, colour_task(), config(
        "fisher-norm", delta_codec="topk/k0.1+zstd", fisher_codec="bf16+zstd"))
    report = sparse.run()
    # measured frames: fp32 ones carry a header on top of 2 x 4 bytes per parameter
    params = tiny_base.edge.adapters.num_parameters() * 4
    assert exact.rounds[0].param_bytes_up > 2 * params
    assert report.rounds[0].param_bytes_up < exact.rounds[0].param_bytes_up / 2
    assert set(sparse._feedback) == {"client-00", "client-01", "client-02"}  # residual per device
    schemes = {row["scheme"]: row for row in report.codec_report}
    assert schemes["fp32"]["rel_error"] == 0.0 and 0 < schemes["int8/b64"]["rel_error"] < 0.05
    assert schemes["topk/k0.01+zstd3"]["bytes"] < schemes["fp16"]["bytes"]
    assert "topk/k0.1+zstd3" in report_markdown(report)


@pytest.mark.parametrize("spec", ["fp16", "bf16+zstd", "int8/b64+zstd", "topk/k0.1+zstd"])
def test_simulated_uploads_are_what_a_device_ships(tiny_base, spec: str) -> None:  # type: ignore[no-untyped-def]
    """Every lossy delta codec goes through error feedback in the simulation as on a device
    (edge.device_round.encode_update): over two rounds the server merges the same Δθ and the
    device keeps the same residual."""
    sim = Simulation(tiny_base, colour_task(), config("fisher-norm", delta_codec=spec))
    schemes = UpdateCodec(delta=Scheme.parse(spec), fisher=Scheme.parse("bf16+zstd"))
    task = TrainTask(task_id="task-0001", round_id=1, global_version=1, base_version="tiny",
                     strategy="fisher-norm", codec=schemes, deadline_at=time.time() + 600)
    shapes = {k: tuple(v.shape) for k, v in tiny_base.edge.adapters.adapter_state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    residual: AdapterState = {}
    for _ in range(2):
        delta = {k: 1e-3 * torch.randn(s, generator=generator) for k, s in shapes.items()}
        fisher = {k: torch.rand(s, generator=generator) for k, s in shapes.items()}
        device = encode_update(task, AdapterUpdate("client-00", dict(delta), 10, dict(fisher)),
                               {}, residual, "u-test-0001")
        residual = device.residual
        shipped, _ = decode_update(unpack(device.payload, UpdateMessage)[1], expected=shapes)
        simulated = RoundResult(AdapterUpdate("client-00", delta, 10, fisher))
        sim._upload([simulated], SimReport({}, "tiny", {}, {}, {}))
        assert all(torch.equal(simulated.update.delta[k], shipped[k]) for k in shapes)
    assert all(torch.equal(sim._feedback["client-00"][k], residual[k]) for k in shapes)
    assert any(bool(v.abs().max() > 0) for v in residual.values())  # lossy: something kept


def test_bad_codec_names_the_problem() -> None:
    with pytest.raises(ValueError, match="does not apply to 'fp16'"):
        config("fednano", delta_codec="fp16/b64")


def test_paired_run_shares_round_one_and_matches_separate_runs(tiny_base) -> None:  # type: ignore[no-untyped-def]
    from fednano.simulate import RoundCache

    cache = RoundCache()
    fedavg = Simulation(tiny_base, colour_task(), config("fedavg"), cache=cache).run()
    momentum = config("fedavg", strategy_options={"server_momentum": 0.5, "server_lr": 2.0})
    shared = Simulation(tiny_base, colour_task(), momentum, cache=cache).run()
    assert cache.hits == 3  # round 1 of each device came from the first method
    alone = Simulation(tiny_base, colour_task(), momentum).run()  # no cache
    assert shared.final["accuracy"] == alone.final["accuracy"]
    assert shared.rounds[0].activation_bytes_up == alone.rounds[0].activation_bytes_up
    assert shared.rounds[0].activation_bytes_up == fedavg.rounds[0].activation_bytes_up


def test_a_method_without_fisher_reuses_a_fisher_methods_round(tiny_base) -> None:  # type: ignore[no-untyped-def]
    from fednano.simulate import RoundCache

    cache = RoundCache()
    Simulation(tiny_base, colour_task(), config("fisher-norm"), cache=cache).run()
    shared = Simulation(tiny_base, colour_task(), config("fedavg"), cache=cache).run()
    assert cache.hits == 3
    alone = Simulation(tiny_base, colour_task(), config("fedavg")).run()
    assert shared.final["accuracy"] == alone.final["accuracy"]
    # Its traffic is its own: the Fisher's LLM calls are not counted for FedAvg.
    assert shared.rounds[0].activation_bytes_up == alone.rounds[0].activation_bytes_up


def test_run_methods_writes_one_report_per_method_and_resumes(  # type: ignore[no-untyped-def]
    tiny_base, tmp_path: Path, monkeypatch
) -> None:
    from fednano import simulate

    monkeypatch.setattr(simulate, "load_base_and_task",
                        lambda config, home, task=None: (tiny_base, colour_task()))
    configs = [config("fedavg"), config("fisher-norm", strategy_options={"ffa": True})]
    reports = simulate.run_methods(configs, tmp_path, tmp_path / "pair")
    assert [r.config["strategy"] for r in reports] == ["fisher-norm", "fedavg"]  # Fisher first
    assert (tmp_path / "pair" / "fedavg" / "report.json").exists()
    assert (tmp_path / "pair" / "fisher-norm+ffa=true" / "report.json").exists()
    assert simulate.run_methods(configs, tmp_path, tmp_path / "pair") == []  # all done
    with pytest.raises(ValueError, match="same settings"):
        simulate.run_methods([config("fedavg"), config("fedavg", alpha=1.0)], tmp_path)


def test_lockstep_simulation_matches_the_sequential_one(tiny_base) -> None:  # type: ignore[no-untyped-def]
    assert not config("fedavg").use_lockstep  # off on the CPU unless asked for
    together = Simulation(tiny_base, colour_task(), config("fisher-norm", lockstep=True)).run()
    alone = Simulation(tiny_base, colour_task(), config("fisher-norm", lockstep=False)).run()
    assert together.final["accuracy"] == alone.final["accuracy"]
    assert [r.mean_loss for r in together.rounds] == pytest.approx(
        [r.mean_loss for r in alone.rounds], rel=1e-5)
    assert together.rounds[1].activation_bytes_up == alone.rounds[1].activation_bytes_up


def test_the_adapter_rank_is_the_bases_and_another_is_refused(tmp_path: Path) -> None:
    from cloud.base.manifest import AdapterMismatchError
    from fednano.simulate import load_base_and_task, with_base_rank

    base = SimpleNamespace(adapter_config=AdapterConfig(rank=4, alpha=8), version="tiny")
    assert config("fedavg").adapter_rank is None  # unset: the base's
    assert with_base_rank(config("fedavg"), base).adapter_rank == 4  # type: ignore[arg-type]
    assert with_base_rank(config("fedavg", adapter_rank=4), base).adapter_rank == 4  # type: ignore[arg-type]
    with pytest.raises(AdapterMismatchError, match="records NanoAdapter rank 4, not 8"):
        with_base_rank(config("fedavg", adapter_rank=8), base)  # type: ignore[arg-type]
    write_recorded_base(tmp_path)  # rank 8, checked before anything heavy loads
    with pytest.raises(AdapterMismatchError, match="fednano base build --rank 4"):
        load_base_and_task(config("fedavg", adapter_rank=4), tmp_path)

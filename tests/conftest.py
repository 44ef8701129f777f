"""Shared fixtures: tiny random-init models and a toy tokenizer for unit tests (no weights)."""

from __future__ import annotations

import pytest
import torch

from tests.toy_tokenizer import WordTokenizer

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def word_tokenizer() -> WordTokenizer:
    return WordTokenizer()


@pytest.fixture
def tiny_llm():  # type: ignore[no-untyped-def]
    """A 2-layer random-init Llama (width 32) behind the in-process LLM backend."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cloud.llm_backend import InProcessLLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, initializer_range=0.5,
    )
    model = LlamaForCausalLM(config).eval()
    return model, InProcessLLM.from_causal_lm(model)


@pytest.fixture
def tiny_edge(tiny_llm):  # type: ignore[no-untyped-def]
    """A NanoEdge over the tiny LLM's embeddings with a PoolingConnector (C=12, grid 2)."""
    from shared.adapters import AdapterConfig
    from shared.connector import PoolingConnector
    from shared.nanoedge import NanoEdge

    model, _ = tiny_llm
    torch.manual_seed(1)
    embedder = torch.nn.Embedding.from_pretrained(model.get_input_embeddings().weight.clone())
    return NanoEdge(PoolingConnector(12, 32, grid=2), embedder, AdapterConfig(rank=4, alpha=8))


def _private_broker(devices: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from tests.brokers import BrokerUnavailable, MosquittoBroker

    try:
        instance = MosquittoBroker(devices=devices, services=("cloud",))
    except BrokerUnavailable as err:  # no mosquitto binary
        pytest.fail(str(err))
    try:
        instance.start()
    except BrokerUnavailable as err:  # it did not start: the message carries its log
        instance.close()
        pytest.fail(str(err))
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture
def broker():  # type: ignore[no-untyped-def]
    """A private Mosquitto (tests/brokers.py): devices dev-a, dev-b; service user cloud.

    Fails (not skips) when the mosquitto binary is missing: the broker is the point of the
    tests that use it (CI installs it; see scripts/services.sh).
    """
    yield from _private_broker(("dev-a", "dev-b"))


@pytest.fixture
def llm_broker():  # type: ignore[no-untyped-def]
    """Like ``broker``, with four devices: dev-a, dev-b, dev-c, dev-d."""
    yield from _private_broker(("dev-a", "dev-b", "dev-c", "dev-d"))


@pytest.fixture
def token(settings):  # type: ignore[no-untyped-def]
    """An operator token in the database of the requesting module's ``settings`` fixture."""
    from cloud.api.security import create_operator_token
    from cloud.db.session import make_engine, make_session_factory, session_scope

    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        _, value = create_operator_token(session, name="alice")
    engine.dispose()
    return value


@pytest.fixture
def client(settings, token: str):  # type: ignore[no-untyped-def]
    """A TestClient of the cloud app on ``settings``, authorised with ``token``."""
    from fastapi.testclient import TestClient

    from cloud.api.main import create_app

    app = create_app(settings)
    with TestClient(app) as test_client:
        test_client.headers["Authorization"] = f"Bearer {token}"
        yield test_client
    app.state.fednano.engine.dispose()


@pytest.fixture
def registry_session(tmp_path):  # type: ignore[no-untyped-def]
    """A session on a fresh, migrated SQLite database under ``tmp_path`` (the registry's)."""
    from cloud.db import migrate
    from cloud.db.session import make_engine, make_session_factory, sqlite_url

    url = sqlite_url(tmp_path / "cloud.db")
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as db:
        yield db
    engine.dispose()

"""The real embedded default model (SmolLM2-135M-Instruct): `pytest -m default_model` selects these."""

from __future__ import annotations

import pytest

from plugboard_client import Client
from tests.support.server import ServerThread, server_config

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def default_server():
    # Converts the embedded GGUF on first use (~20 s), then loads from the cache.
    srv = ServerThread(server_config(model="default")).start()
    yield srv
    srv.stop()


def test_the_capital_of_france_is_paris(default_server):
    with Client(default_server.target, timeout=120) as c:
        r = c.generate(
            messages=[{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32
        )
        info = c.model_info()
    assert "Paris" in r.text
    assert info.name == "SmolLM2-135M-Instruct"
    assert (info.num_layers, info.num_attention_heads, info.num_key_value_heads) == (30, 9, 3)


def test_tuning_a_sentiment_prefix_publishes_what_it_trained(default_server, tmp_path):
    """A short prefix run on a few dozen Rotten Tomatoes reviews, published to the default-model server."""
    from plugboard_tuning.data import rotten_tomatoes
    from plugboard_tuning.run import RunOptions, run
    from plugboard_tuning.train import TrainConfig

    train, test = rotten_tomatoes(limit_train=64, limit_test=32)
    result = run(
        RunOptions(
            train=train,
            test=test,
            config=TrainConfig(method="prefix", max_steps=16, batch_size=8),
            output=tmp_path / "sentiment",
            device="cpu",
            name="sentiment",
            publish=default_server.target,
            progress=False,
        )
    )
    assert result is not None and result.before is not None
    report = result.report
    losses = (report["training"]["first_loss"], report["training"]["last_loss"])
    assert losses[1] < 0.5 * losses[0], losses
    # The base model rarely answers with just the label word; the prefix learns to (then stops).
    assert result.before.exact_match < 0.2 < result.after.exact_match, (result.before, result.after)
    assert result.after.accuracy is not None and result.after.accuracy >= 0.5
    check = report["served_check"]
    assert check["ok"] and check["score_agree"] == check["generate_agree"] == 32, check["mismatches"]

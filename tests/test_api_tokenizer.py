"""The chat route with a real mlx-lm tokenizer (a tiny byte-level BPE built here, loaded the way the
node loads a model's tokenizer): templates, multi-byte characters split over tokens, stop strings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from mlx_lm.tokenizer_utils import TokenizerWrapper, load
from tokenizers import ByteLevelBPETokenizer

from exo.api.cluster_port import ChatTokenizer
from tests.harness.api_checks import sse_events, streamed_text
from tests.harness.fakes import END_OF_SEQUENCE, FakeNodeServices

ANSWER = "Héllo wörld 🙂 done"
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TokenizerWrapper:
    model_dir: Path = tmp_path_factory.mktemp("tiny-bpe")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["Hello world, the quick brown fox.", "Héllo wörld", "done"], vocab_size=300, special_tokens=["</s>"]
    )
    bpe.save(str(model_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "chat_template": TEMPLATE}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    wrapper = load(model_dir)
    assert wrapper.eos_token_ids == {END_OF_SEQUENCE}
    return wrapper


@pytest.fixture
def services(services: FakeNodeServices, tokenizer: TokenizerWrapper) -> FakeNodeServices:
    fake = services
    as_protocol: ChatTokenizer = tokenizer  # the node can hand mlx-lm's wrapper to the API as is
    fake.tokenizers["exo-tiny"] = as_protocol  # type: ignore[assignment]
    fake.script = list(tokenizer.encode(ANSWER, add_special_tokens=False))
    return fake


def chat(client: TestClient[Any], **body: Any) -> Any:
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    return client.post("/v1/chat/completions", json={"model": "exo-tiny", "messages": messages, **body})


def test_prompt_is_the_rendered_template(
    client: TestClient[Any], services: FakeNodeServices, tokenizer: TokenizerWrapper
) -> None:
    assert chat(client).status_code == 200
    prompt = services.generate_calls[0].prompt_tokens
    assert tokenizer.decode(prompt) == "<system>be nice\n<user>hi\n<assistant>"


def test_multibyte_characters_stream_whole(client: TestClient[Any], tokenizer: TokenizerWrapper) -> None:
    # The emoji is several byte-level tokens: no chunk may carry half of it.
    assert len(tokenizer.encode("🙂", add_special_tokens=False)) > 1
    events = sse_events(chat(client, stream=True))
    pieces = [event["choices"][0]["delta"].get("content") for event in events[:-1] if event["choices"]]
    assert all("\ufffd" not in piece for piece in pieces if piece)
    assert streamed_text(events) == ANSWER


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens(client: TestClient[Any], stream: bool) -> None:
    response = chat(client, stream=stream, stop=["ö", "🙂"])
    if stream:
        text = streamed_text(sse_events(response))
    else:
        text = response.json()["choices"][0]["message"]["content"]
    assert text == "Héllo w"

import functools

import pytest

from squeezekv.loading import load_model
from squeezekv.reference import load_heldout


@functools.cache
def reference():
    """The bundled reference model and its tokenizer, loaded once for the serving tests."""
    tokenizer, model = load_model(None, "cpu", "float32")
    return tokenizer, model


@pytest.fixture(scope="session")
def reference_model():
    return reference()


@pytest.fixture(scope="session")
def heldout_prompts(reference_model):
    """Token ids of held-out text, of several lengths (short: the tests must stay fast on a CPU)."""
    tokenizer, _ = reference_model
    texts = [document["text"] for document in load_heldout("short")[:4]]
    return [
        tokenizer(text[:chars]).input_ids for text, chars in zip(texts, [400, 150, 300, 100], strict=True)
    ]

"""synthetic.py's models have the exact shapes of the models they stand for: the parameter
counts Meta publishes (the figures measured on them are then the real models' figures)."""

from __future__ import annotations

import math

import pytest

from fvboot.synthetic import SPECS, _config, _tensor_shapes


@pytest.mark.parametrize("name, parameters", [
    ("llama-3.2-3b", 3_212_749_824),  # Llama-3.2-3B-Instruct (tied embeddings)
    ("llama-3.1-8b", 8_030_261_248),  # Llama-3.1-8B-Instruct
])
def test_each_stand_in_has_its_models_parameter_count(name, parameters):
    assert sum(math.prod(shape) for _, shape in _tensor_shapes(SPECS[name])) == parameters


def test_the_8b_config_is_llama_3_1s():
    cfg = _config(SPECS["llama-3.1-8b"], 1, 2)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4096, 32, 8, 128)
    assert cfg["rope_scaling"]["factor"] == 8.0 and cfg["tie_word_embeddings"] is False

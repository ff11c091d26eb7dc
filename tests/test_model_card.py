"""spikelm.model_card: the Hub's card format, with the figures of the run it describes."""

import math

import torch
import yaml
from conftest import tiny_config

from spikelm import SpikeLMForCausalLM
from spikelm.conversion import ann_twin_config
from spikelm.model_card import card_energy, model_card


def front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_a_card_carries_the_front_matter_the_figures_and_how_to_load():
    model = SpikeLMForCausalLM(tiny_config()).eval()
    energy = card_energy(model, torch.randint(0, 48, (1, 24)))
    metrics = {"eval_bits_per_byte": 2.5604, "start_eval_bits_per_byte": 4.5471, "eval_perplexity": 51.43,
               "global_step": 500}
    card = model_card(model.config, metrics, energy, command="spikelm train --preset small --output runs/q",
                      base_model="runs/gpt2", datasets=["karpathy/tiny_shakespeare"])
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"spikelm", "spiking-neural-network"} <= set(meta["tags"])
    assert meta["base_model"] == "runs/gpt2" and meta["datasets"] == ["karpathy/tiny_shakespeare"]
    assert "bits per byte: 2.5604 (before training: 4.5471)" in card and "optimiser steps: 500" in card
    # rounded against the model: its pJ up, GPT-2's down, the ratio up
    assert f"| this model | {math.ceil(energy['pj_per_token'])} |" in card
    assert f"| same-shape GPT-2 (all MACs) | {math.floor(energy['ann_pj_per_token'])} |" in card
    assert f"Ratio to GPT-2: {math.ceil(round(energy['energy_ratio'] * 1000, 6)) / 1000:.3f}" in card
    assert "layers.1" in card
    assert "spikelm train --preset small --output runs/q" in card and "trust_remote_code=True" in card


def test_an_ann_gets_no_energy_rows_and_no_base_model():
    twin = SpikeLMForCausalLM(ann_twin_config(tiny_config())).eval()
    assert card_energy(twin, torch.randint(0, 48, (1, 8))) is None
    card = model_card(twin.config)
    assert "base_model" not in front_matter(card) and "Energy per token" not in card and "Not measured." in card

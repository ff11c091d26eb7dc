"""A tiny saved spikelm model with a character tokenizer, for the evaluation tests."""

from spikelm import SpikeLMForCausalLM
from conftest import make_char_tokenizer, shakespeare_text, tiny_config


def save_tiny_model(directory, **overrides):
    """Save a tiny random spikelm model and a character tokenizer of the bundled text into `directory`."""
    tokenizer = make_char_tokenizer(shakespeare_text())
    settings = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    settings.update(overrides)
    model = SpikeLMForCausalLM(tiny_config(**settings)).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer

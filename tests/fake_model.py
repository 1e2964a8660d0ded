"""A stand-in for the MiniLM tokenizer and encoder, for the caching tests (no model package needed)."""

import torch


class FakeTokenizer:
    """A token per word, its id 1000 + the word's length."""

    cls_token_id, sep_token_id = 101, 102

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1000 + len(word) for word in text.split()]}


class FakeEncoder:
    """Hidden states that are never zero; Ctrl-C at call ``stop_at``."""

    class config:
        hidden_size = 6

    def __init__(self, stop_at: int | None = None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, input_ids, attention_mask, output_hidden_states):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        hidden = input_ids.float().unsqueeze(-1).expand(*input_ids.shape, 6) + torch.arange(6)
        return type("Out", (), {"hidden_states": [hidden, hidden]})

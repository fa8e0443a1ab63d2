"""What a measurement feeds a model: token ids from its tokenizer, or fixed ids when it has none.

A model without a tokenizer (built from a config in the notebook, or a folder without tokenizer
files) is still measured: with token ids drawn from its vocabulary under a fixed seed, so every
variant of it, in any run, sees the very same ids. Such ids carry no language, so quality is then
judged by agreement with the original model, not by perplexity (``measure.agreement``).
"""

from __future__ import annotations

from .. import data as _data

FIXED_SEED = 1234


def vocab_size(model) -> int | None:
    """The number of token ids the model accepts (its input embedding's rows), or None."""
    import torch

    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    if isinstance(emb, torch.nn.Embedding):
        return emb.num_embeddings
    config = getattr(model, "config", None)
    n = getattr(config, "vocab_size", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def max_positions(model) -> int | None:
    """The longest sequence the model's positions allow (``max_position_embeddings`` and kin), or None."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def fixed_token_ids(model, n: int, *, seed: int = FIXED_SEED):
    """``n`` token ids [n] drawn uniformly from the model's vocabulary with a fixed seed (RNG untouched)."""
    import torch

    vocab = vocab_size(model)
    if vocab is None:
        raise ValueError(f"this {type(model).__name__} has no token embedding, so effnb cannot make token ids "
                         "for it; pass example_inputs=... (a tensor or a dict of tensors) to measure it")
    gen = torch.Generator().manual_seed(seed)
    # the first ids are often special tokens (padding, begin/end): draw from the rest when there are enough
    low = 8 if vocab > 64 else 0
    return torch.randint(low, vocab, (n,), generator=gen, dtype=torch.long)


def token_ids_for(model, n: int, text=None):
    """([n] token ids, how they were made): the tokenizer's on ``text`` if the model has one, else fixed ids.

    Short texts are repeated to reach ``n``; the second value says which it was, for the report.
    """
    from ..models import find_tokenizer
    from .quality import token_ids

    tok = find_tokenizer(model)
    if tok is None:
        return fixed_token_ids(model, n), f"{n} fixed token ids (seed {FIXED_SEED}; no tokenizer)"
    ids = token_ids(tok, _data.resolve_text(text))
    if ids.numel() == 0:
        raise ValueError("the text gives no tokens")
    while ids.numel() < n:
        ids = ids.repeat(2)
    return ids[:n], ("built-in" if text is None else "user") + " text"
